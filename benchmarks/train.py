"""Training throughput: real images/s shown to the critic, per resolution stage, per variant.

Each stage runs a few warm-up iterations and then ``--iters`` timed iterations (one
iteration = n_critic critic steps + 1 G step = n_critic * batch real images) of the given
profile's networks and batch sizes on synthetic data, at alpha 0.5 for faded stages (both
paths computed: the slowest case). Prints a table and writes
``benchmarks/results/train.json``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train.py --profile cpu --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.trainer import Trainer  # noqa: E402
from radsynth.config import load_params  # noqa: E402
from radsynth.io import write_json  # noqa: E402
from tests.model.datasets import make_dataset  # noqa: E402

ANCHOR_S_PER_KIMG = 13.0   # StyleGAN2-ADA, 128x128, one V100 (Karras et al. 2020, table 2 / README)


def bench_variant(profile: str, variant: str, iters: int, warmup: int, overrides: list[str], device: str) -> list[dict]:
    over = {"model.variant": variant, "train.tracking": False, "train.progress": False, "train.device": device}
    for item in overrides:
        k, v = item.split("=", 1)
        over[k] = json.loads(v) if v[:1] in "[{0123456789-tf" and v not in ("tiny",) else v
    params = load_params(ROOT / "params.yaml", profile=profile, overrides=over)
    final = params.train.final_resolution or params.data.img_resolution
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_dataset(Path(tmp) / "ds", n=96, res=final)
        tr = Trainer(params, ds, Path(tmp) / "out")
        for st in tr.schedule:
            alpha = 0.5 if st.fade_iters else 1.0
            for _ in range(warmup):
                tr._iteration(st, alpha)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                tr._iteration(st, alpha)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            images = iters * st.images_per_iter
            ips = images / dt
            rows.append({"variant": variant, "resolution": st.resolution, "batch": st.batch, "alpha": alpha,
                         "images_per_s": round(ips, 1), "s_per_kimg": round(1000.0 / ips, 1),
                         "cpu_s_per_kimg": round(1000.0 * cpu / images, 1), "stage_kimg": round(st.kimg, 2),
                         "stage_minutes_est": round(st.kimg * 1000.0 / ips / 60.0, 2),
                         "stage_cpu_minutes": round(st.kimg * 1000.0 * cpu / images / 60.0, 2),
                         "amp": tr.amp, "device": str(tr.device)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--variants", default="pgcgan-sa,dcgan")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="param override key=value (JSON value)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for variant in args.variants.split(","):
        rows += bench_variant(args.profile, variant, args.iters, args.warmup, args.set, args.device)
    print(f"{'variant':<10} {'res':>4} {'batch':>5} {'alpha':>5} {'img/s':>8} {'s/kimg':>8} {'cpu-s/kimg':>10} {'kimg':>6} {'wall min':>8} {'cpu min':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['resolution']:>4} {r['batch']:>5} {r['alpha']:>5} {r['images_per_s']:>8} {r['s_per_kimg']:>8} "
              f"{r['cpu_s_per_kimg']:>10} {r['stage_kimg']:>6} {r['stage_minutes_est']:>8} {r['stage_cpu_minutes']:>8}")
    for variant in args.variants.split(","):
        wall = sum(r["stage_minutes_est"] for r in rows if r["variant"] == variant)
        cpu = sum(r["stage_cpu_minutes"] for r in rows if r["variant"] == variant)
        print(f"{variant}: whole {args.profile} schedule at these rates: {wall:.1f} min wall, {cpu:.1f} CPU-min")
    info = {"profile": args.profile, "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None,
            "anchor": {"name": "StyleGAN2-ADA 128x128 on one V100", "s_per_kimg": ANCHOR_S_PER_KIMG}, "rows": rows}
    write_json(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
