"""Hostile uploads: status and peak memory growth of every bad (and warned) upload to the web app.

Usage (from the project root; memory, not wall-clock, so no exclusive lock is needed)::

    /work/tools/heavy env PYTHONPATH=$PWD .venv/bin/python benchmarks/hostile_uploads.py

Runs the same cases (``tests/serving/web/hostile_uploads.py``) and the same child-process probe as
``tests/serving/web/test_app.py::test_bad_upload_is_refused_clearly_cheaply_and_nothing_is_kept``
(the web app in Flask's test client with the tiny profile, ``web.max_pixels`` 2048 x 2048,
a torch backend, so no Triton is needed): each upload is posted twice in one child process,
the second time measured as ``VmHWM - VmRSS(before)`` after resetting the peak-RSS mark (C
allocations of the codecs included). Also measures the control: pydicom alone decoding the
JPEG 2000 size lie, which the guard refuses before any decoder runs.

Prints a table and writes ``benchmarks/results/hostile_uploads.json``; exits 1 if any case
gets another status than the test expects or grows past the bound (4 bytes x ``web.max_pixels``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile_uploads.json"))
    args = parser.parse_args(argv)

    from tests.memprobe import measure
    from tests.serving.web.hostile_uploads import (BAD_UPLOADS, CONTROL_SETUP, MEMORY_BOUND_PER_PIXEL, PROBE_SETUP,
                                                   WARNED_UPLOADS)

    bound = MEMORY_BOUND_PER_PIXEL * 2048 * 2048
    probed = measure(PROBE_SETUP, [*BAD_UPLOADS, *WARNED_UPLOADS])
    control = measure(CONTROL_SETUP, ["unguarded"])["unguarded"]
    rows = []
    for name, result in probed.items():
        want = BAD_UPLOADS[name][2] if name in BAD_UPLOADS else 200
        got = (result["value"] or {}).get("status")
        rows.append({"case": name, "expected": want, "status": got, "growth_mib": result["growth"] / 2**20,
                     "ok": got == want and (name in WARNED_UPLOADS or result["growth"] < bound)})
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bound_mib": bound / 2**20,
              "web.max_pixels": 2048 * 2048, "cases": rows,
              "control_unguarded_j2k_growth_mib": control["growth"] / 2**20, "control_result": control["value"],
              "passed": all(r["ok"] for r in rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, args.out)

    print(f"hostile uploads: web.max_pixels 2048x2048, bound {bound / 2**20:.0f} MiB peak growth; {record['machine']}")
    print(f"{'case':<58} {'want':>4} {'got':>4} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['case']:<58} {r['expected']:>4} {r['status']!s:>4} {r['growth_mib']:>9.2f}{'' if r['ok'] else '  FAIL'}")
    print(f"control: pydicom alone decoding the JPEG 2000 size lie: {record['control_unguarded_j2k_growth_mib']:.0f} MiB "
          f"({control['value']})")
    print(f"wrote {args.out}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
