"""Training throughput: real images/s shown to the critic, per resolution stage, per recipe.

Each stage runs ``--warmup`` iterations and then ``--iters`` timed iterations (one
iteration = n_critic critic steps + 1 G step = n_critic * batch real images) of the
profile's networks, batch sizes and recipe on synthetic data, at alpha 0.5 for faded
stages (both paths computed: the slowest case). Every thread count in ``--threads`` is
measured in one process; ``--ranks 2`` measures DDP instead (gloo, one thread per rank).
The wall estimate is the schedule's kimg per stage times its measured s/kimg. Prints a
table and writes ``benchmarks/results/train.json``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/train.py --profile cpu --recipes cpu-pgcgan-sa,cpu-dcgan --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.trainer import Trainer  # noqa: E402
from radsynth.config import load_params, parse_override  # noqa: E402
from radsynth.io import write_json  # noqa: E402
from tests.model.datasets import make_dataset  # noqa: E402

ANCHOR_S_PER_KIMG = 13.0   # StyleGAN2-ADA, 128x128, one V100 (Karras et al. 2020, table 2 / README)


def _params(profile: str, recipe: str, overrides: list[str], device: str, threads: int):
    over = {"train.tracking": False, "train.progress": False, "train.device": device, "train.threads": threads}
    if recipe:
        over["train.recipe"] = recipe
    for item in overrides:
        k, v = parse_override(item)
        over[k] = v
    return load_params(ROOT / "params.yaml", profile=profile, overrides=over)


def bench(params, data_root: Path, iters: int, warmup: int, stages: list[int] | None = None) -> list[dict]:
    """Time every stage of ``params``' schedule (in this process, or this DDP rank)."""
    from radsynth.dataset import load_dataset

    ds = load_dataset(data_root)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(params, ds, Path(tmp) / "out")
        rows = []
        for st in tr.schedule:
            if stages and st.resolution not in stages:
                continue
            alpha = 0.5 if st.fade_iters else 1.0
            tr.it = 0
            for _ in range(warmup):
                tr._iteration(st, alpha)
            tr.dist.barrier()
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                tr._iteration(st, alpha)
            tr.dist.barrier()
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            images = iters * st.images_per_iter
            rows.append({"recipe": params.train.recipe, "variant": params.model.variant, "resolution": st.resolution,
                         "batch": st.batch, "alpha": alpha, "threads": torch.get_num_threads(), "ranks": tr.dist.world,
                         "images_per_s": round(images / dt, 1), "s_per_kimg": round(1000.0 * dt / images, 2),
                         "cpu_s_per_kimg": round(1000.0 * cpu / images, 2), "stage_kimg": round(st.kimg, 2),
                         "stage_minutes_est": round(st.kimg * 1000.0 * dt / images / 60.0, 2),
                         "amp": tr.amp, "device": str(tr.device)})
        tr.stats.reset()
    return rows


def _rank_main(rank: int, world: int, port: int, args, recipe: str, data_root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    params = _params(args.profile, recipe, args.set, "cpu", 1)
    rows = bench(params, Path(data_root), args.iters, args.warmup, args.stages)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--recipes", default="", help="comma-separated train.recipe names (default: the profile's own)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts to measure")
    ap.add_argument("--ranks", type=int, default=1, help="DDP ranks (gloo, 1 thread each) instead of threads")
    ap.add_argument("--stages", default="", help="comma-separated resolutions to time (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="param override key=value (YAML value, as radsynth --set)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",") if s]
    recipes = args.recipes.split(",") if args.recipes else [""]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = _params(args.profile, recipes[0], args.set, args.device, 1)
        final = probe.train.final_resolution or probe.data.img_resolution
        data_root = make_dataset(Path(tmp) / "ds", n=96, res=final).root
        for recipe in recipes:
            if args.ranks > 1:
                import torch.multiprocessing as mp

                out = Path(tmp) / "rows.json"
                mp.spawn(_rank_main, args=(args.ranks, _free_port(), args, recipe, str(data_root), str(out)), nprocs=args.ranks)
                rows += json.loads(out.read_text())
                continue
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                rows += bench(_params(args.profile, recipe, args.set, args.device, threads), data_root, args.iters, args.warmup, args.stages)
    print(f"{'recipe':<15} {'variant':<10} {'res':>4} {'batch':>5} {'thr':>3} {'ranks':>5} {'img/s':>8} {'s/kimg':>7} {'cpu-s/kimg':>10} {'kimg':>6} {'wall min':>8}")
    for r in rows:
        print(f"{r['recipe']:<15} {r['variant']:<10} {r['resolution']:>4} {r['batch']:>5} {r['threads']:>3} {r['ranks']:>5} {r['images_per_s']:>8} "
              f"{r['s_per_kimg']:>7} {r['cpu_s_per_kimg']:>10} {r['stage_kimg']:>6} {r['stage_minutes_est']:>8}")
    for key in sorted({(r["recipe"], r["threads"], r["ranks"]) for r in rows}):
        wall = sum(r["stage_minutes_est"] for r in rows if (r["recipe"], r["threads"], r["ranks"]) == key)
        print(f"{key[0] or args.profile} threads {key[1]} ranks {key[2]}: the schedule at these rates: {wall:.1f} min wall")
    info = {"profile": args.profile, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "loadavg_after": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None,
            "anchor": {"name": "StyleGAN2-ADA 128x128 on one V100", "s_per_kimg": ANCHOR_S_PER_KIMG}, "rows": rows}
    write_json(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
