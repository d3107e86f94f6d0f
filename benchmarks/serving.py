"""Serving benchmark: PyTorch eager, ONNX Runtime, Triton (gRPC, dynamic batching), naive Flask.

All in one run, on the same model (an untrained generator of the ``model:`` config at
``--resolution``, default 64x64: speed does not depend on training) and machine:

- ``pytorch``: eager ``G(z, c)`` in-process, one image per call, ``c`` caller threads.
- ``onnxruntime``: the exported ONNX in-process, one image per call, ``c`` caller threads.
- ``triton``: a real tritonserver (this repo's cpu flavour), one image per request, ``c``
  requests in flight from tritonclient's asyncio gRPC API; the server batches them.
- ``naive``: Flask + PyTorch per request (``serving/naive.py``) under gunicorn (one sync
  worker per core), ``c`` keep-alive HTTP connections.

Reported: p50/p99 latency of one image and images/s at each concurrency, plus batch-64
throughput of ONNX Runtime in-process vs one Triton request of 64. Prints a table and writes
``benchmarks/results/serving.json``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radsynth.config import load_params  # noqa: E402
from radsynth.latent import z_from_seed  # noqa: E402

CLASSES = ["NORMAL", "PNEUMONIA"]


def _stats(latencies: list[float], count: int, elapsed: float) -> dict:
    lat = np.asarray(latencies) * 1000.0
    return {
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "images_per_s": count / elapsed, "requests": len(latencies),
    }


def run_threads(call, concurrency: int, duration: float, warmup: float = 0.5) -> dict:
    """``concurrency`` threads call ``call(i)`` (one image each) for ``duration`` seconds."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    state = {"measure": False, "stop": False}

    def worker(k: int) -> None:
        i = 0
        while not state["stop"]:
            t0 = time.perf_counter()
            call(k * 1_000_000 + i)
            if state["measure"]:
                latencies[k].append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    state["measure"] = True
    start = time.perf_counter()
    time.sleep(duration)
    state["measure"] = False
    elapsed = time.perf_counter() - start
    state["stop"] = True
    for t in threads:
        t.join()
    flat = [x for part in latencies for x in part]
    return _stats(flat, len(flat), elapsed)


async def _triton_async(url: str, z_dim: int, concurrency: int, duration: float, warmup: float = 0.5) -> dict:
    import tritonclient.grpc.aio as aio
    import tritonclient.grpc as grpcclient

    client = aio.InferenceServerClient(url)
    latencies: list[float] = []
    state = {"measure": False, "stop": False}

    async def worker(k: int) -> None:
        i = 0
        while not state["stop"]:
            z = z_from_seed(k * 1_000_000 + i, 1, z_dim)                       # [1, z_dim]
            z_in = grpcclient.InferInput("z", [1, z_dim], "FP32")
            z_in.set_data_from_numpy(z)
            c_in = grpcclient.InferInput("class", [1, 1], "INT64")
            c_in.set_data_from_numpy(np.array([[i % len(CLASSES)]], dtype=np.int64))
            t0 = time.perf_counter()
            result = await client.infer("radsynth-generator", [z_in, c_in])
            result.as_numpy("image")
            if state["measure"]:
                latencies.append(time.perf_counter() - t0)
            i += 1

    async def clock() -> float:
        await asyncio.sleep(warmup)
        state["measure"] = True
        start = time.perf_counter()
        await asyncio.sleep(duration)
        state["measure"] = False
        elapsed = time.perf_counter() - start
        state["stop"] = True
        return elapsed

    tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
    elapsed = await clock()
    await asyncio.gather(*tasks)
    await client.close()
    return _stats(latencies, len(latencies), elapsed)


def _batch_throughput(call, batch: int, duration: float) -> dict:
    call()                                                                      # warm-up
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(times) < 3:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "p50_ms": float(np.median(times) * 1000), "images_per_s": batch * len(times) / sum(times), "calls": len(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu", help="params profile whose model: section is used (default cpu)")
    ap.add_argument("--variant", default="", help="model.variant to build (default: the profile's)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds measured per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["pytorch", "onnxruntime", "triton", "naive"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from model.checkpoint import save_generator
    from model.registry import build_networks
    from serving.repository import build_repository
    from serving.server import TritonServer, free_port

    params = load_params(ROOT / "params.yaml", profile=args.profile,
                         overrides={"model.variant": args.variant} if args.variant else None)
    G, _ = build_networks(params.model, len(CLASSES), 1, args.resolution, seed=0)
    G.eval().requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="radsynth-bench-"))
    from components.export import export_generator

    meta = {"classes": CLASSES, "variant": params.model.variant, "data_md5": "benchmark", "params_digest": params.digest()}
    export_generator(G, meta, work / "generator.onnx", params.export)
    onnx_path = work / "generator.onnx"
    save_generator(work / "G.safetensors", G, {
        "classes": CLASSES, "variant": params.model.variant, "z_dim": G.z_dim, "img_resolution": args.resolution,
        "img_channels": 1, "data_md5": "bench", "params_digest": params.digest(),
    })
    z_dim = G.z_dim
    results: dict = {
        "model": {"variant": params.model.variant, "profile": args.profile, "resolution": args.resolution, "z_dim": z_dim,
                  "parameters": int(sum(p.numel() for p in G.parameters()))},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
        "duration_s": args.duration, "single": {}, "batch64": {},
    }
    print(f"model {params.model.variant} {args.resolution}x{args.resolution}, z_dim {z_dim}, "
          f"{results['model']['parameters'] / 1e6:.2f} M parameters; {os.cpu_count()} CPUs", flush=True)

    def ort_session(threads: int) -> "ort.InferenceSession":
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    # In-process ORT gets the same thread setting as each Triton instance (serve.intra_op_threads).
    session = ort_session(params.serve.intra_op_threads)

    def torch_call(i: int) -> None:
        with torch.no_grad():
            G(torch.from_numpy(z_from_seed(i, 1, z_dim)), torch.tensor([i % len(CLASSES)]))

    def ort_call(i: int) -> None:
        session.run(["image"], {"z": z_from_seed(i, 1, z_dim), "class": np.array([i % len(CLASSES)], dtype=np.int64)})

    def record(mode: str, c: int, stats: dict) -> None:
        results["single"].setdefault(mode, {})[str(c)] = stats
        print(f"{mode:12s} c={c:<3d} p50 {stats['p50_ms']:8.2f} ms  p99 {stats['p99_ms']:8.2f} ms  "
              f"{stats['images_per_s']:8.1f} images/s", flush=True)

    for mode, call in (("pytorch", torch_call), ("onnxruntime", ort_call)):
        if mode in args.modes:
            for c in args.concurrency:
                record(mode, c, run_threads(call, c, args.duration))

    z64 = z_from_seed(1, 64, z_dim)
    c64 = np.arange(64, dtype=np.int64) % len(CLASSES)
    # Batch-64 baseline: the better of ORT's default threads and serve.intra_op_threads.
    candidates = [_batch_throughput(lambda: s.run(["image"], {"z": z64, "class": c64}), 64, args.duration)
                  for s in (session, ort_session(0))]
    results["batch64"]["onnxruntime"] = max(candidates, key=lambda b: b["images_per_s"])

    if "triton" in args.modes:
        overrides = {
            "serve.onnx": {"radsynth-generator": str(onnx_path)}, "serve.repository": str(work / "repo"),
            "serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port(),
            "serve.max_batch_size": 64,
        }
        tparams = load_params(ROOT / "params.yaml", profile=args.profile, overrides=overrides)
        build_repository(tparams)
        results["triton_config"] = {k: getattr(tparams.serve, k) for k in
                                    ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "instance_count", "intra_op_threads")}
        with TritonServer(tparams.serve, work / "repo") as server:
            from serving.client import Client

            with Client(server.grpc_url, timeout_s=120) as client:
                before = client.statistics()
                for c in args.concurrency:
                    record("triton", c, asyncio.run(_triton_async(server.grpc_url, z_dim, c, args.duration)))
                after = client.statistics()
                results["triton_batching"] = {k: after[k] - before[k] for k in after}
                results["batch64"]["triton"] = _batch_throughput(lambda: client.infer(z64, c64), 64, args.duration)

    if "naive" in args.modes:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT), RADSYNTH_NAIVE_G=str(work / "G.safetensors"), RADSYNTH_NAIVE_THREADS="1")
        gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
        workers = os.cpu_count() or 1
        proc = subprocess.Popen([gunicorn, "-w", str(workers), "-b", f"127.0.0.1:{port}", "--log-level", "warning",
                                 "serving.naive:create_app()"], cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.3)
            local = threading.local()

            def naive_call(i: int) -> None:
                if not hasattr(local, "conn"):
                    local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                body = json.dumps({"condition": CLASSES[i % len(CLASSES)], "seed": i, "n": 1})
                local.conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
                response = local.conn.getresponse()
                json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(f"naive endpoint answered {response.status}")

            results["naive_workers"] = workers
            for c in args.concurrency:
                record("naive", c, run_threads(naive_call, c, args.duration))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    single = results["single"]
    top = str(max(args.concurrency))
    ratios = {}
    if "triton" in single and "naive" in single:
        ratios[f"triton_vs_naive_c{top}"] = single["triton"][top]["images_per_s"] / single["naive"][top]["images_per_s"]
    if "triton" in results["batch64"]:
        ratios["triton_vs_ort_batch64"] = results["batch64"]["triton"]["images_per_s"] / results["batch64"]["onnxruntime"]["images_per_s"]
    results["ratios"] = ratios
    for name, b in results["batch64"].items():
        print(f"batch 64     {name:12s} p50 {b['p50_ms']:8.1f} ms  {b['images_per_s']:8.1f} images/s")
    if "triton_batching" in results:
        tb = results["triton_batching"]
        print(f"triton: {tb['inference_count']} images in {tb['execution_count']} executions "
              f"(mean batch {tb['inference_count'] / max(tb['execution_count'], 1):.1f})")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    from radsynth.io import write_json

    write_json(args.out, results)
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
