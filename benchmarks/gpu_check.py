"""GPU checks of the training path (called by ``benchmarks/gpu_check.sh``; runs on CPU too, for a dry run).

Three parts, each reported as PASS / FAIL / SKIP with its figures, all in one JSON:

1. **throughput**: the ``gpu`` profile's networks, batches and recipe at 128x128 on
   synthetic data, a fixed number of kimg per stage (the 128 stage timed at alpha 0.5 and
   1.0); prints s/kimg and img/s per stage beside the anchor (StyleGAN2-ADA: 13 s/kimg at
   128x128 on one V100).
2. **bf16 vs fp32**: two trainers from the same seed, 50 iterations each at 64x64, one with
   bfloat16 autocast, one without; the loss trajectories must agree (mean |diff| of the
   critic loss under 10 % of its mean |value|, G_ema outputs within 0.1) and neither may
   diverge. SKIP where ``torch.cuda.is_bf16_supported()`` is false.
3. **triton**: export the trained G_ema to ONNX, build a one-model repository of the
   ``gpu`` flavour (``onnxruntime_onnx``, KIND_GPU), start tritonserver and run the
   client's ``--check`` round trip. SKIP (with the reason) when tritonserver or
   tritonclient is not installed, as on a bare PyTorch machine.

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --kimg 0.2 --resolution 16   # dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR_S_PER_KIMG = 13.0


def _params(profile: str, device: str, overrides: dict):
    from radsynth.config import load_params

    over = {"train.tracking": False, "train.progress": False, "train.device": device, **overrides}
    return load_params(ROOT / "params.yaml", profile=profile, overrides=over)


def throughput(args, data_root: Path, work: Path) -> dict:
    import torch

    from model.trainer import Trainer
    from radsynth.dataset import load_dataset

    params = _params("gpu", args.device, {"train.final_resolution": args.resolution})
    tr = Trainer(params, load_dataset(data_root), work / "throughput")
    rows = []
    for st in tr.schedule:
        for alpha in ((0.5, 1.0) if st.fade_iters else (1.0,)):
            iters = max(2, round(args.kimg * 1000 / st.images_per_iter))
            for _ in range(2):
                tr._iteration(st, alpha)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                tr._iteration(st, alpha)
            if tr.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            images = iters * st.images_per_iter
            rows.append({"resolution": st.resolution, "alpha": alpha, "batch": st.batch, "iters": iters,
                         "s_per_kimg": round(1000 * dt / images, 3), "images_per_s": round(images / dt, 1)})
    means = tr.stats.means()
    finite = all(v == v and abs(v) != float("inf") for v in means.values())
    top = [r for r in rows if r["resolution"] == tr.schedule[-1].resolution and r["alpha"] == 1.0]
    return {"status": "PASS" if finite else "FAIL", "rows": rows, "recipe": params.train.recipe, "amp": tr.amp,
            "top_s_per_kimg": top[0]["s_per_kimg"] if top else None, "anchor_s_per_kimg": ANCHOR_S_PER_KIMG,
            "losses_finite": finite, "trainer": tr}


def bf16_agreement(args, data_root: Path, work: Path) -> dict:
    import torch

    from model.sampling import generate
    from model.trainer import Trainer
    from radsynth.dataset import load_dataset

    if args.device == "cpu" or not torch.cuda.is_available():
        return {"status": "SKIP", "reason": "no CUDA device (bf16 autocast is CUDA-only here)"}
    if not torch.cuda.is_bf16_supported():
        return {"status": "SKIP", "reason": f"{torch.cuda.get_device_name(0)} does not support bfloat16"}
    runs = {}
    for amp in (True, False):
        params = _params("gpu", args.device, {"train.final_resolution": 64, "train.amp": amp, "train.augment": []})
        tr = Trainer(params, load_dataset(data_root), work / f"amp_{amp}")
        st = tr.schedule[-1]
        losses = []
        for _ in range(args.iters):
            tr._iteration(st, 1.0)
            losses.append(tr.stats.means())
            tr.stats.reset()
        torch.cuda.synchronize()
        tr.G_ema.set_stage(st.resolution, 1.0)
        runs[amp] = {"amp_active": tr.amp, "loss_D": [m["train/loss_D"] for m in losses], "loss_G": [m["train/loss_G"] for m in losses],
                     "images": generate(tr.G_ema, [0, 1, 2] * 4, seed=3)}
    d16, d32 = torch.tensor(runs[True]["loss_D"]), torch.tensor(runs[False]["loss_D"])
    rel = float((d16 - d32).abs().mean() / d32.abs().mean().clamp(min=1e-6))
    img = float((runs[True]["images"] - runs[False]["images"]).abs().max())
    finite = bool(torch.isfinite(d16).all() and torch.isfinite(d32).all())
    ok = finite and rel < 0.10 and img < 0.1 and runs[True]["amp_active"] and not runs[False]["amp_active"]
    return {"status": "PASS" if ok else "FAIL", "iterations": args.iters, "loss_D_mean_rel_diff": round(rel, 4),
            "G_ema_max_abs_diff": round(img, 4), "finite": finite,
            "loss_D_bf16_last": runs[True]["loss_D"][-1], "loss_D_fp32_last": runs[False]["loss_D"][-1]}


def triton_round_trip(args, trainer, work: Path) -> dict:
    try:
        import tritonclient.grpc  # noqa: F401

        from serving.server import ServerError, TritonServer, find_tritonserver, free_port
    except ImportError as exc:
        return {"status": "SKIP", "reason": f"tritonclient / serving imports unavailable here ({exc})"}
    try:
        find_tritonserver()
    except ServerError as exc:
        return {"status": "SKIP", "reason": str(exc)}
    from components.export import export_generator
    from serving.client import Client
    from serving.repository import build_repository

    G = trainer.G_ema.eval().cpu()
    G.set_stage(G.img_resolution, 1.0)
    meta = {"classes": trainer.classes, "variant": G.variant, "data_md5": "synthetic", "params_digest": "gpu-check"}
    onnx_path = work / "export" / "generator.onnx"
    params = _params("gpu", args.device, {})
    export_generator(G, meta, onnx_path, params.export)
    ports = {"serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port()}
    params = _params("gpu", args.device, {**ports, "serve.host": "127.0.0.1", "serve.models": [params.registry.model_name],
                                          "serve.onnx": {params.registry.model_name: str(onnx_path)}})
    repo = build_repository(params, work / "repository", flavour="gpu")
    server = TritonServer(params.serve, repo, log_path=work / "tritonserver.log")
    try:
        server.start().wait_ready()
        with Client(server.grpc_url, model_name=params.registry.model_name) as client:
            checks = client.check()
    except Exception as exc:  # report, do not hide: the log path says more
        return {"status": "FAIL", "reason": f"{type(exc).__name__}: {exc}", "log": str(server.log_path)}
    finally:
        server.stop()
    failed = [c for c in checks if not c[1]]
    return {"status": "PASS" if not failed else "FAIL", "checks": len(checks), "failed": [f"{n}: {d}" for n, _, d in failed]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--resolution", type=int, default=128, help="final resolution of the throughput run")
    ap.add_argument("--kimg", type=float, default=2.0, help="timed kimg per stage (and per alpha)")
    ap.add_argument("--iters", type=int, default=50, help="iterations of the bf16 / fp32 comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)

    import torch

    from radsynth.io import write_json
    from tests.model.datasets import make_dataset

    report: dict = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="radsynth-gpu-check-") as tmp:
        work = Path(tmp)
        data_root = make_dataset(work / "ds", n=256, res=max(args.resolution, 64)).root
        trainer = None
        for name, fn in (("throughput", lambda: throughput(args, data_root, work)),
                         ("bf16_vs_fp32", lambda: bf16_agreement(args, data_root, work)),
                         ("triton", lambda: triton_round_trip(args, trainer, work) if trainer is not None
                          else {"status": "SKIP", "reason": "no trained generator (throughput failed)"})):
            t0 = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:  # one failed part must not hide the others
                result = {"status": "FAIL", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            if name == "throughput" and "trainer" in result:
                trainer = result.pop("trainer")
            result["seconds"] = round(time.perf_counter() - t0, 1)
            report[name] = result
            print(f"[{result['status']}] {name} ({result['seconds']} s): "
                  + json.dumps({k: v for k, v in result.items() if k not in ("rows", "status", "seconds", "traceback")}))
            if name == "throughput":
                for r in result.get("rows", []):
                    print(f"    {r['resolution']:>4}x{r['resolution']:<4} alpha {r['alpha']:.1f} batch {r['batch']:>3}: "
                          f"{r['s_per_kimg']:8.3f} s/kimg {r['images_per_s']:10.1f} img/s")
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(args.out, report)
    failed = [k for k in ("throughput", "bf16_vs_fp32", "triton") if report[k]["status"] == "FAIL"]
    print(f"gpu_check: {'FAIL ' + ', '.join(failed) if failed else 'no failures'} in {report['seconds']} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    sys.exit(main())
