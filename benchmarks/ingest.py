"""Ingest throughput: studies/s over the whole sample export with 1 and 2 processes.

Usage (from the project root, after ``dvc pull``)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ingest.py [--profile cpu] [--repeats 3] [--workers 1 2]

Each run is a complete ``ingest()`` (read, decode, prepare, pseudonymise, label join,
de-duplication, atomic write) into a temporary folder with a throw-away salt. Prints a table
and writes ``benchmarks/results/ingest.json``. Target: >= 200 studies/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.ingest import ingest  # noqa: E402
from radsynth.config import load_params  # noqa: E402

TARGET = 200.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest.json"))
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    rows = []
    with tempfile.TemporaryDirectory(prefix="radsynth-bench-") as tmp:
        salt = Path(tmp) / "salt"
        salt.write_text(secrets.token_hex(32))
        params = load_params(ROOT / "params.yaml", profile=args.profile,
                             overrides={"data.salt_env": "", "data.salt_file": str(salt)})
        for workers in args.workers:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = ingest(params, out_dir=Path(tmp) / "out", workers=workers, progress=False)
                times.append(time.perf_counter() - start)
            best, median = min(times), statistics.median(times)
            rows.append({
                "workers": workers,
                "studies": result.num_records,
                "images_kept": result.num_images,
                "seconds_median": round(median, 3),
                "seconds_best": round(best, 3),
                "studies_per_s_median": round(result.num_records / median, 1),
                "studies_per_s_best": round(result.num_records / best, 1),
            })
    header = f"{'workers':>7} {'studies':>8} {'median s':>9} {'studies/s':>10} {'best studies/s':>15}"
    print(f"ingest benchmark: profile {args.profile}, img_resolution {params.data.img_resolution}, {args.repeats} repeats")
    print(header)
    for r in rows:
        print(f"{r['workers']:>7} {r['studies']:>8} {r['seconds_median']:>9.2f} {r['studies_per_s_median']:>10.0f} {r['studies_per_s_best']:>15.0f}")
    two = next((r for r in rows if r["workers"] == 2), None)
    if two:
        print(f"target >= {TARGET:.0f} studies/s on 2 processes: {'met' if two['studies_per_s_median'] >= TARGET else 'NOT met'}")
    record = {
        "benchmark": "ingest",
        "profile": args.profile,
        "img_resolution": params.data.img_resolution,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "target_studies_per_s_2_workers": TARGET,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
