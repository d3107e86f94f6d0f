"""``make demo`` from a fresh clone: time to URLs printed, a second run's time, and a clean Ctrl-C.

Usage (from the project root; needs ``../shared`` like any checkout, and the ports of
``serve``/``web``/MLflow free)::

    python3 benchmarks/demo.py [--workdir /tmp/radsynth-demo-bench] [--timeout 3600]

Clones this repository's HEAD into ``<workdir>/main`` (with ``<workdir>/shared`` linked to
``../shared``), runs ``make demo`` in its own process group, waits for "Press Ctrl-C", checks
the web app answers and ``radsynth generate --check`` passes, sends SIGINT to the group (what
Ctrl-C in a terminal does), checks no tritonserver / gunicorn / MLflow process of the clone is
left, then does the same once more to time the reuse. Prints a table and writes
``benchmarks/results/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = "Press Ctrl-C"


def _leftovers(clone: Path) -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines()
               if str(clone) in line and any(k in line for k in ("tritonserver", "gunicorn", "mlflow")))


def _web_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except Exception:  # noqa: BLE001 - reported as 0
        return 0


def run_once(clone: Path, log: Path, timeout: float) -> dict:
    start = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["make", "demo"], cwd=clone, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    up = None
    while time.monotonic() - start < timeout:
        time.sleep(1)
        if READY in log.read_text(errors="replace"):
            up = time.monotonic() - start
            break
        if proc.poll() is not None:
            break
    text = log.read_text(errors="replace").replace("\r", "\n")
    result = {"up_s": round(up, 1) if up is not None else None,
              "gate_passed": "gate passed" in text, "pipeline_line": next((ln for ln in text.splitlines() if "pipeline done" in ln), "")}
    if up is not None:
        result["web_status"] = _web_status("http://127.0.0.1:8050/")
        check = subprocess.run([str(clone / ".venv" / "bin" / "radsynth"), "generate", "--check"], cwd=clone,
                               capture_output=True, text=True)
        result["generate_check"] = (check.stdout.strip().splitlines() or [""])[-1]
        result["generate_check_rc"] = check.returncode
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(2)
    result["exit_code"] = proc.returncode
    result["processes_left"] = _leftovers(clone)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/radsynth-demo-bench"))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the first run's URLs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo.json")
    args = ap.parse_args()

    shared = (ROOT.parent / "shared").resolve()
    if not shared.is_dir():
        print(f"error: {shared} not found: the clone needs ../shared (the sample export's DVC remote)", file=sys.stderr)
        return 2
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    (args.workdir / "shared").symlink_to(shared)
    clone = args.workdir / "main"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)

    runs = {"first": run_once(clone, args.workdir / "demo1.log", args.timeout)}
    if runs["first"]["up_s"] is not None:
        runs["second"] = run_once(clone, args.workdir / "demo2.log", 600.0)

    print(f"{'run':<8} {'up (s)':>8} {'gate':>6} {'web':>5} {'check':<40} {'exit':>5} {'left':>5}")
    for name, r in runs.items():
        print(f"{name:<8} {r['up_s'] if r['up_s'] is not None else 'never':>8} {'pass' if r['gate_passed'] else 'FAIL':>6} "
              f"{r.get('web_status', '-'):>5} {r.get('generate_check', '-')[:40]:<40} {r['exit_code']:>5} {r['processes_left']:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                    "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                             text=True).stdout.strip(),
                                    "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if runs["first"]["up_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
