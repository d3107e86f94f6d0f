"""Soak: the web app and Triton under N users for T seconds of mixed good and bad traffic.

Usage (from the project root; a timing figure, so under the exclusive lock)::

    /work/tools/exclusive env PYTHONPATH=$PWD .venv/bin/python benchmarks/soak.py [--users 16] [--duration 60]

Builds the end-to-end test's stack on loopback ports only (tiny models, a real tritonserver
serving generator + encoder + classifier from a real MLflow registry with signed champions,
``radsynth web`` under gunicorn with ``web.workers`` x ``web.threads``), warms it up, then lets
``--users`` sessions (each with its own cookies and CSRF token) pick requests at random from a
fixed mix for ``--duration`` seconds:

    home page, /healthz, generate (1-4 images, seed only), generate with a DICOM or PNG upload,
    permalinks, and hostile uploads (not an image, truncated DICOM, 1x1 PNG, Deflated bomb,
    JPEG 2000 size lie, a name in Number of Frames, a 4-gigapixel header, a colour PNG)

Each kind has the status it must get (200, or its 4xx); anything else (a 5xx, a dropped
connection, a wrong 4xx) is *unexpected*. The resident memory of every process of the stack
(gunicorn master and workers, tritonserver and its python-backend stubs) is read after the
warm-up and again after the load and a short rest.

Pass: 0 unexpected statuses and every process's memory back within ``--memory-tolerance``
(10 %) of its post-warm-up value. Prints a table, writes ``benchmarks/results/soak.json``,
exits 1 on a failure. Bounded: the stack is torn down at the end; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DICOM = ROOT.parent / "shared" / "data" / "dicom-fixtures" / "chest_DX_nih_nhsx.dcm"

from tests.serving.web.hostile_uploads import BAD_UPLOADS  # noqa: E402  (after the sys.path line)


# The hostile kinds are cases of the web's hostile-upload corpus (tests/serving/web/hostile_uploads.py),
# which also says the status each must get.
HOSTILE = {
    "not_image": "not an image, named .png",
    "truncated_dicom": "truncated DICOM",
    "tiny_png": "1 x 1 PNG",
    "colour_png": "colour PNG",
    "deflate_bomb": "Deflated DICOM bomb (300 KiB -> 300 MiB)",
    "j2k_size_lie": "JPEG 2000 codestream 8192 x 8192 in a 16 x 16 header",
    "name_in_frames": "Number of Frames holding a patient name",
    "giga_header": "4-gigapixel DICOM header",
}


def _inputs() -> dict[str, bytes]:
    from tests.serving.web.hostile_uploads import GREY, png_bytes

    return {"dicom": DICOM.read_bytes(), "png": png_bytes(GREY), **{kind: BAD_UPLOADS[case][0]() for kind, case in HOSTILE.items()}}


# kind -> (weight, expected status, upload input or None)
MIX: dict[str, tuple[int, int, str | None]] = {
    "home": (2, 200, None),
    "healthz": (1, 200, None),
    "generate": (4, 200, None),
    "generate_dicom": (3, 200, "dicom"),
    "generate_png": (1, 200, "png"),
    "permalink": (3, 200, None),
    **{kind: (1, BAD_UPLOADS[case][2], kind) for kind, case in HOSTILE.items()},
}


class User:
    """One browser-like session: cookie jar + CSRF token."""

    def __init__(self, url: str, inputs: dict[str, bytes], seed: int):
        import requests

        self.url, self.inputs, self.rng = url, inputs, random.Random(seed)
        self.http = requests.Session()
        page = self.http.get(url, timeout=60)
        page.raise_for_status()
        self.token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        self.conditions = re.findall(r'<option value="([^"]+)"', page.text)

    def request(self, kind: str) -> int:
        expected_upload = MIX[kind][2]
        condition = self.rng.choice(self.conditions)
        seed = self.rng.randrange(1 << 40)
        if kind == "home":
            return self.http.get(self.url, timeout=120).status_code
        if kind == "healthz":
            return self.http.get(self.url + "healthz", timeout=120).status_code
        if kind == "permalink":
            n = self.rng.randint(1, 4)
            return self.http.get(f"{self.url}result?condition={condition}&seed={seed}&n={n}", timeout=120).status_code
        data = {"csrf_token": self.token, "condition": condition, "n": str(self.rng.randint(1, 4)), "seed": str(seed)}
        if expected_upload:
            files = {"image": (f"upload-{kind}.bin", self.inputs[expected_upload], "application/octet-stream")}
        else:
            files = {"image": ("", b"")}
        return self.http.post(self.url + "generate", data=data, files=files, timeout=120).status_code


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def stack_processes(web_pid: int, triton_pid: int) -> dict[str, int]:
    """name -> pid of every process of the stack (gunicorn master + workers, tritonserver + stubs)."""
    import psutil

    out = {}
    for root, label in ((web_pid, "web"), (triton_pid, "triton")):
        proc = psutil.Process(root)
        out[f"{label}:{proc.name()}:{root}"] = root
        for child in proc.children(recursive=True):
            out[f"{label}:{child.name()}:{child.pid}"] = child.pid
    return out


def rss(pids: dict[str, int]) -> dict[str, int | None]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            out[name] = None
    return out


def soak(url: str, users: int, duration: float, inputs: dict[str, bytes]) -> dict:
    kinds = list(MIX)
    weights = [MIX[k][0] for k in kinds]
    sessions = [User(url, inputs, seed=k) for k in range(users)]
    lock = threading.Lock()
    by_kind: dict[str, dict] = {k: {"requests": 0, "unexpected": 0, "statuses": {}, "times": []} for k in kinds}
    stop = time.monotonic() + duration

    def run(user: User) -> None:
        while time.monotonic() < stop:
            kind = user.rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                status = user.request(kind)
            except Exception:  # a dropped connection or a timeout is unexpected, counted as 599
                status = 599
            elapsed = time.perf_counter() - start
            with lock:
                row = by_kind[kind]
                row["requests"] += 1
                row["statuses"][status] = row["statuses"].get(status, 0) + 1
                row["unexpected"] += status != MIX[kind][1]
                row["times"].append(elapsed)

    threads = [threading.Thread(target=run, args=(u,)) for u in sessions]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    table = {}
    for kind, row in by_kind.items():
        table[kind] = {"expected": MIX[kind][1], "requests": row["requests"], "unexpected": row["unexpected"],
                       "statuses": {str(k): v for k, v in sorted(row["statuses"].items())},
                       "p50_ms": 1000 * percentile(row["times"], 50), "p99_ms": 1000 * percentile(row["times"], 99)}
    total = sum(r["requests"] for r in table.values())
    return {"users": users, "duration_s": round(wall, 1), "requests": total, "requests_per_s": total / wall,
            "unexpected": sum(r["unexpected"] for r in table.values()), "kinds": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rest", type=float, default=10.0, help="idle seconds after the load before memory is read again")
    parser.add_argument("--memory-tolerance", type=float, default=0.10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = parser.parse_args(argv)

    from tests.serving.web.stack import serving_stack

    inputs = _inputs()
    with tempfile.TemporaryDirectory(prefix="radsynth-soak-") as tmp:
        with serving_stack(Path(tmp), "soak", sets={"web.max_images": 4}) as stack:
            params = stack.params
            warm = soak(stack.url, args.users, min(15.0, args.duration / 4), inputs)  # every kind, every worker thread
            time.sleep(args.rest)
            pids = stack_processes(stack.web.process.pid, stack.triton.process.pid)
            before = rss(pids)
            result = soak(stack.url, args.users, args.duration, inputs)
            time.sleep(args.rest)
            after = rss(pids)
            stderr_text = stack.web.log.read_text(errors="replace")

    memory = {}
    for name in pids:
        b, a = before[name], after[name]
        change = None if not b or a is None else (a - b) / b
        memory[name] = {"before_mib": None if b is None else b / 2**20, "after_mib": None if a is None else a / 2**20,
                        "change": change, "ok": change is not None and change <= args.memory_tolerance}
    leaked = [v for v in ("DOE^JANE", "Covid0000") if v in stderr_text]
    passed = result["unexpected"] == 0 and all(m["ok"] for m in memory.values()) and not leaked
    record = {"setup": (f"self-contained: tiny profile (16x16 generator), tritonserver cpu flavour (generator, encoder, "
                        f"classifier), gunicorn {params.web.workers} workers x {params.web.threads} threads, loopback only"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "load_average_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "warm_up": {k: warm[k] for k in ("requests", "unexpected")}, **result, "memory": memory,
              "identifiers_in_web_log": leaked, "passed": passed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")

    print(f"soak: {record['setup']}")
    print(f"{args.users} users, {result['duration_s']:.0f} s: {result['requests']} requests ({result['requests_per_s']:.1f}/s), "
          f"{result['unexpected']} unexpected")
    print(f"{'kind':<18} {'want':>4} {'requests':>8} {'unexp':>5} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for kind, row in result["kinds"].items():
        print(f"{kind:<18} {row['expected']:>4} {row['requests']:>8} {row['unexpected']:>5} {row['p50_ms']:>8.1f} "
              f"{row['p99_ms']:>8.1f}  {row['statuses']}")
    print(f"{'process':<44} {'MiB before':>10} {'MiB after':>10} {'change':>8}")
    for name, m in memory.items():
        change = "gone" if m["change"] is None else f"{100 * m['change']:+.1f}%"
        print(f"{name:<44} {m['before_mib'] or 0:>10.1f} {m['after_mib'] or 0:>10.1f} {change:>8}{'' if m['ok'] else '  FAIL'}")
    print(f"{'PASS' if passed else 'FAIL'}; wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
