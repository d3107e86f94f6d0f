"""Wall time of a full evaluation (sample G, every metric, gate, reports) with a cold and a warm cache.

Cold: an empty ``eval.cache_dir``, so the domain classifier is trained and the real-image
features are extracted. Warm: the same call again, reusing both. Uses the prepared dataset
under ``<artifacts>/dataset`` (run ``radsynth ingest`` and ``radsynth preprocess`` first) and an
untrained generator of the profile (evaluation cost does not depend on the weights).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/evaluate.py --profile cpu --sizes 1000 5000

Prints a table and writes ``benchmarks/results/evaluate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000], help="generated images in total")
    parser.add_argument("--dataset", default=None, help="default <artifacts>/dataset")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
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
        G, _ = build_networks(base.model, ds.num_classes, ds.img_channels, res, seed=0)
        gen = save_generator(tmp / "G_ema.safetensors", G, {"classes": ds.classes, "data_md5": "bench", "params_digest": "bench"})
        for n in args.sizes:
            per_class = max(1, n // ds.num_classes)
            cache = tmp / f"cache-{n}"
            params = load_params(profile=args.profile, overrides={"eval.samples_per_class": per_class, "eval.cache_dir": str(cache)})
            for label in ("cold cache", "warm cache"):
                t0 = time.perf_counter()
                result = evaluate(params, gen, dataset_dir, tmp / f"eval-{n}")
                rows.append({"generated": per_class * ds.num_classes, "cache": label, "seconds": round(time.perf_counter() - t0, 1),
                             "resolution": res, "gate": "passed" if result.passed else "failed"})
                print(f"{rows[-1]['generated']:>9} {label:<11} {rows[-1]['seconds']:>8.1f} s", flush=True)
    print(f"\n{'generated':>9} {'cache':<11} {'seconds':>10}")
    for r in rows:
        print(f"{r['generated']:>9} {r['cache']:<11} {r['seconds']:>10.1f}")
    out = Path("benchmarks/results/evaluate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"profile": args.profile, "rows": rows, "machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "dataset": {"train": int((ds.splits == 'train').sum()), "val": int((ds.splits == 'val').sum()),
                                           "test": int((ds.splits == 'test').sum())}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
