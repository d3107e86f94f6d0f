"""Web app latency and concurrency: one-image generate end to end, and N users for T seconds.

Usage (from the project root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/web.py [--url http://127.0.0.1:8050/]
        [--requests 100] [--users 16] [--duration 30]

With ``--url`` it measures a running ``radsynth web`` (e.g. the one ``make demo`` starts).
Without, it builds the same self-contained stack as the end-to-end test (tiny models, a real
tritonserver serving generator + encoder + classifier, a real MLflow registry, gunicorn with
``web.workers`` x ``web.threads``) on loopback ports, measures, and tears it down.

Measured, over HTTP on loopback, each request a full page (form post -> CSRF check ->
Triton calls -> PNG/DICOM/zip encoding -> HTML):

1. sequential latency, p50/p99, of ``POST /generate`` for one image: seed only, and with the
   fixture DICOM uploaded (decode + preprocess + encoder + reconstruction SSIM + classifier);
2. ``--users`` concurrent users, each in its own session, posting one-image generates back to
   back for ``--duration`` seconds: requests/s, p50/p99, and the error count (target: 0).

Prints a table and writes ``benchmarks/results/web.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DICOM = ROOT.parent / "shared" / "data" / "dicom-fixtures" / "chest_DX_nih_nhsx.dcm"


class User:
    """One browser-like session: cookie jar + CSRF token."""

    def __init__(self, url: str):
        import requests

        self.url = url
        self.http = requests.Session()
        page = self.http.get(url, timeout=60)
        page.raise_for_status()
        self.token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        self.condition = re.search(r'<option value="([^"]+)"', page.text).group(1)

    def generate(self, seed: int, upload: bytes | None = None) -> tuple[int, float]:
        files = {"image": ("upload.dcm", upload, "application/octet-stream")} if upload else {"image": ("", b"")}
        data = {"csrf_token": self.token, "condition": self.condition, "n": "1", "seed": str(seed)}
        start = time.perf_counter()
        resp = self.http.post(self.url + "generate", data=data, files=files, timeout=120)
        elapsed = time.perf_counter() - start
        ok = resp.status_code == 200 and 'id="fact-seed"' in resp.text
        return (200 if ok else resp.status_code or 599), elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def sequential(url: str, n: int, upload: bytes | None) -> dict:
    user = User(url)
    user.generate(0, upload)  # warm-up (worker imports, first Triton call)
    times, errors = [], 0
    for i in range(n):
        status, t = user.generate(1000 + i, upload)
        errors += status != 200
        times.append(t)
    return {"requests": n, "errors": errors, "p50_ms": 1000 * percentile(times, 50),
            "p99_ms": 1000 * percentile(times, 99), "mean_ms": 1000 * statistics.fmean(times)}


def concurrent(url: str, users: int, duration: float) -> dict:
    sessions = [User(url) for _ in range(users)]
    times: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def run(user: User, k: int) -> None:
        seed = 10_000 * (k + 1)
        while time.monotonic() < stop:
            try:
                status, t = user.generate(seed)
            except Exception:  # a dropped connection is an error, counted like a 5xx
                status, t = 599, 0.0
            seed += 1
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    times.append(t)

    threads = [threading.Thread(target=run, args=(u, k)) for k, u in enumerate(sessions)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    total = sum(statuses.values())
    return {"users": users, "duration_s": round(wall, 2), "requests": total, "errors": total - statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "requests_per_s": total / wall,
            "p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99)}


def self_contained_stack(tmp: Path):
    """Start the e2e test's stack (tests/serving/web/stack.py); returns (url, stop, params)."""
    import contextlib

    from tests.serving.web.stack import serving_stack

    stop = contextlib.ExitStack()
    stack = stop.enter_context(serving_stack(tmp, "benchmark"))
    return stack.url, stop.close, stack.params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running radsynth web (default: start a tiny self-contained stack)")
    parser.add_argument("--requests", type=int, default=100, help="sequential requests per latency series")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web.json"))
    args = parser.parse_args(argv)

    stop, setup = None, "given --url"
    with tempfile.TemporaryDirectory(prefix="radsynth-web-bench-") as tmp:
        if args.url:
            url = args.url.rstrip("/") + "/"
        else:
            url, stop, params = self_contained_stack(Path(tmp))
            setup = (f"self-contained: tiny profile (16x16 generator, z_dim {params.model.z_dim}), tritonserver cpu flavour, "
                     f"gunicorn {params.web.workers} workers x {params.web.threads} threads, loopback")
        try:
            upload = DICOM.read_bytes() if DICOM.is_file() else None
            results = {
                "seed_only": sequential(url, args.requests, None),
                "with_dicom_upload": sequential(url, args.requests, upload) if upload else None,
                "concurrent": concurrent(url, args.users, args.duration),
            }
        finally:
            if stop:
                stop()
    record = {"url": url, "setup": setup, "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "load_average": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")

    print(f"web app end to end ({setup})")
    print(f"{'series':<28} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for name in ("seed_only", "with_dicom_upload"):
        r = results[name]
        if r:
            print(f"{name + ', 1 user':<28} {r['requests']:>8} {r['errors']:>6} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {'':>7}")
    c = results["concurrent"]
    label = f"{c['users']} users, {c['duration_s']:.0f} s"
    print(f"{label:<28} {c['requests']:>8} {c['errors']:>6} {c['p50_ms']:>8.1f} {c['p99_ms']:>8.1f} {c['requests_per_s']:>7.1f}")
    print(f"wrote {args.out}")
    return 0 if c["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
