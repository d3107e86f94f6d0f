"""Wall time of a full evaluation (judge, calibration, sample G, every metric, both gate levels,
reports, pictures) with a cold and a warm cache, the judge's training reported separately.

Cold: an empty ``eval.cache_dir``: the judge is trained, the real-image features extracted, the
calibration sets and the real-only utility classifiers computed. Warm: a *different* generator
with the same cache, as when a model engineer evaluates the next model: only what depends on
the generator is computed (sampling, features of generated images, distances, SSIM family,
condition accuracy, memorisation, TSTR and augmentation classifiers). Uses the prepared dataset
under ``<artifacts>/dataset`` (``radsynth ingest`` and ``radsynth preprocess`` first) and
untrained generators of the profile (the cost does not depend on the weights), or ``--generator``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluate.py --profile cpu
    # or in two sittings sharing one cache (each under 15 minutes):
    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluate.py --runs cold --cache /tmp/evalcache
    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluate.py --runs warm --cache /tmp/evalcache

Prints a table and writes ``benchmarks/results/evaluate.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default=None, help="default <artifacts>/dataset")
    parser.add_argument("--generator", default=None, help="a trained G_ema for the warm run (default: an untrained one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--out", default="benchmarks/results/evaluate.json")
    parser.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    parser.add_argument("--cache", default=None, help="cache folder (default: a temporary one); cold empties it first")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from components.evaluate import evaluate
    from model.checkpoint import save_generator
    from model.registry import build_networks
    from radsynth.config import load_params
    from radsynth.dataset import load_dataset

    base = load_params(profile=args.profile)
    dataset_dir = Path(args.dataset or Path(base.paths.artifacts) / "dataset")
    ds = load_dataset(dataset_dir)
    res = base.data.img_resolution
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gens = []
        for seed in (0, 1):
            G, _ = build_networks(base.model, ds.num_classes, ds.img_channels, res, seed=seed)
            gens.append(save_generator(tmp / f"G_{seed}.safetensors", G, {"classes": ds.classes, "data_md5": "bench", "params_digest": "bench"}))
        if args.generator:
            gens[1] = Path(args.generator)
        cache = Path(args.cache) if args.cache else tmp / "cache"
        params = load_params(profile=args.profile, overrides={"eval.cache_dir": str(cache), "eval.tracking": False})
        for label, gen in (("cold", gens[0]), ("warm", gens[1])):
            if label not in args.runs:
                continue
            if label == "cold" and cache.exists():
                shutil.rmtree(cache)
            if label == "warm" and not any(cache.glob("judge-*.safetensors")):
                parser.error(f"--runs warm needs a cache with a trained judge: run --runs cold --cache {cache} first")
            t0 = time.perf_counter()
            result = evaluate(params, gen, dataset_dir, tmp / f"eval-{label}")
            wall = time.perf_counter() - t0
            summary = json.loads((tmp / f"eval-{label}" / "evaluate.json").read_text())
            cal = json.loads((tmp / f"eval-{label}" / "calibration.json").read_text()) if result.calibration else {}
            rows.append({"cache": label, "seconds": round(wall, 1), "judge_train_seconds": summary["judge"]["train_seconds"],
                         "judge_epochs": summary["judge"]["report"]["training"]["epochs"],
                         "calibration_seconds": cal.get("seconds"), "metrics_seconds": summary["protocol"]["seconds"],
                         "generated": int(sum(summary["protocol"]["samples"]["generated"].values())), "resolution": res,
                         "gate": "passed" if result.passed else "failed", "level": result.level})
            r = rows[-1]
            print(f"{label}: {r['seconds']:.1f} s (judge training {r['judge_train_seconds']:.1f} s, calibration "
                  f"{r['calibration_seconds']} s, metrics {r['metrics_seconds']})", flush=True)
    print(f"\n{'cache':<6} {'total s':>8} {'judge s':>8} {'calib s':>8} {'utility s':>10} {'other metrics s':>16}")
    for r in rows:
        m = r["metrics_seconds"]
        other = sum(v for k, v in m.items() if k != "utility")
        print(f"{r['cache']:<6} {r['seconds']:>8.1f} {r['judge_train_seconds']:>8.1f} {r['calibration_seconds'] or 0:>8.1f} "
              f"{m.get('utility', 0):>10.1f} {other:>16.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"profile": args.profile, "rows": rows, "machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "load_average_after": os.getloadavg(),
                               "dataset": {"train": int((ds.splits == 'train').sum()), "val": int((ds.splits == 'val').sum()),
                                           "test": int((ds.splits == 'test').sum())}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
