"""Serving benchmark: Triton (this repository's cpu flavour) against ONNX Runtime in-process.

All figures of one invocation come from one run on one machine, on the same model: an
untrained generator of the profile's ``model:`` section (``--variant`` to change it) at
``--resolution`` (default 64x64; speed does not depend on training), exported by
``components/export.py``. Parts (``--parts``, default all but ``sweep``):

- ``ort``: ONNX Runtime in-process, the limit. One image per call from ``c`` caller threads
  (c=1, 8, 32), and one call of ``b`` images (b = 1..64); each cell is the better of 1
  onnxruntime thread and one per core.
- ``triton``: a real tritonserver with the configuration the profile ships (instances and
  threads derived from the cores, ``serving.repository.plan``). One image per request, ``c``
  requests in flight from tritonclient's async gRPC API (the server batches them); one
  request of ``b`` images; where the time of a c=1 request goes (client + gRPC, Triton's queue
  and compute statistics, the python stub, onnxruntime: Triton's own counters plus the
  model's ``radsynth_backend_*`` metrics); one ``Client.generate`` of ``--generate`` images.
- ``pytorch``: eager ``G(z, c)`` in-process, one image per call, ``c`` threads.
- ``naive``: Flask + PyTorch per request (``serving/naive.py``) under gunicorn.
- ``sweep``: Triton over a grid of batching settings (max queue delay, preferred batch sizes,
  instances x threads): c=1 p50, c=32 and batch-64 images/s against ONNX Runtime measured in
  the same run; prints every point, the best and the chosen (shipped) one.

Targets (issue 18): Triton >= 0.9x ONNX Runtime at batch 64 and at c=32, c=1 p50 <= 2x.
While it runs, the CPU time of every process outside this benchmark's own tree is sampled:
the "other load" line says whether the machine was idle. Prints tables and writes
``benchmarks/results/serving.json``; ``--plot`` draws the batch curve.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py --variant pgcgan-sa --duration 3 --plot docs/img/serving_batch_curve.png
    PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py --variant pgcgan-sa --parts sweep --duration 1.5

``--flavour gpu`` (a GPU machine with onnxruntime-gpu and a tritonserver that has the
onnxruntime backend): the ORT limit on the CUDA provider, Triton's gpu flavour (instance groups
per GPU, warmup; ``--set serve.tensorrt=true`` for the TensorRT provider); the step for
``benchmarks/gpu_check.sh``:

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py --flavour gpu --profile gpu --parts ort triton \
        --duration 3 --out benchmarks/results/serving_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radsynth.config import Params, load_params  # noqa: E402
from radsynth.latent import z_from_seed  # noqa: E402

CLASSES = ["NORMAL", "PNEUMONIA"]
MODEL = "radsynth-generator"
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PARTS = ("ort", "triton", "pytorch", "naive", "sweep")


# --------------------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------------------


def _stats(latencies: list[float], count: int, elapsed: float) -> dict:
    lat = np.asarray(latencies) * 1000.0
    return {
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
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


def triton_cell(url: str, z_dim: int, concurrency: int, duration: float, warmup: float = 0.5,
                on_start=None, on_stop=None) -> dict:
    """``concurrency`` one-image requests in flight for ``duration`` s: a closed loop on
    tritonclient's async API (``async_infer``: each answer's callback sends that user's next
    request), so the load generator spends little of the cores the server needs.

    ``on_start`` / ``on_stop`` run when measuring starts and stops.
    """
    import functools

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    errors: list[str] = []
    state = {"measure": False, "stop": False, "open": concurrency}
    lock = threading.Lock()
    finished = threading.Event()

    def send(k: int, i: int) -> None:
        z_in = grpcclient.InferInput("z", [1, z_dim], "FP32")
        z_in.set_data_from_numpy(z_from_seed(k * 1_000_000 + i, 1, z_dim))     # [1, z_dim]
        c_in = grpcclient.InferInput("class", [1, 1], "INT64")
        c_in.set_data_from_numpy(np.array([[i % len(CLASSES)]], dtype=np.int64))
        client.async_infer(MODEL, [z_in, c_in], functools.partial(answered, k, i, time.perf_counter()))

    def answered(k: int, i: int, t0: float, result, error) -> None:
        elapsed = time.perf_counter() - t0
        if error is None:
            result.as_numpy("image")
            if state["measure"]:
                latencies.append(elapsed)
        else:
            errors.append(str(error))
        if state["stop"] or error is not None:
            with lock:
                state["open"] -= 1
                if state["open"] == 0:
                    finished.set()
            return
        send(k, i + 1)

    for k in range(concurrency):
        send(k, 0)
    time.sleep(warmup)
    if on_start:
        on_start()
    state["measure"] = True
    start = time.perf_counter()
    time.sleep(duration)
    state["measure"] = False
    elapsed = time.perf_counter() - start
    if on_stop:
        on_stop()
    state["stop"] = True
    finished.wait(120)
    client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return _stats(latencies, len(latencies), elapsed)


def batch_throughput(call, batch: int, duration: float) -> dict:
    """``call()`` (one call of ``batch`` images) back to back for ``duration`` s."""
    call()                                                                      # warm-up
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(times) < 3:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "p50_ms": float(np.median(times) * 1000), "images_per_s": batch * len(times) / sum(times), "calls": len(times)}


# --------------------------------------------------------------------------------------
# Is the machine idle? CPU time of every process outside this benchmark's tree
# --------------------------------------------------------------------------------------


class OtherLoad:
    """Samples /proc once a second; sums the CPU time of processes not descended from us."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self._seen: dict[int, int] = {}
        self._busy = 0.0
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _table() -> dict[int, tuple[int, int]]:
        """pid -> (ppid, utime + stime in ticks)."""
        table = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        return table

    def _sample(self) -> float:
        table = self._table()
        ours = {os.getpid()}
        changed = True
        while changed:  # descendants of this process (tritonserver, its stubs, gunicorn)
            changed = False
            for pid, (ppid, _) in table.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        busy = 0
        for pid, (_, ticks) in table.items():
            if pid not in ours and pid in self._seen:
                busy += max(ticks - self._seen[pid], 0)
            self._seen[pid] = ticks
        return busy / self.tick

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval):
            seconds = self._sample()
            self._busy += seconds
            self._peak = max(self._peak, seconds / self.interval)

    def __enter__(self) -> "OtherLoad":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = time.monotonic() - self._start

    def summary(self) -> dict:
        return {"cpu_s": round(self._busy, 2), "mean_cores": round(self._busy / max(self.elapsed, 1e-9), 3),
                "peak_cores_1s": round(self._peak, 2), "seconds": round(self.elapsed, 1),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0


class CoresUsed:
    """Cores used during a cell by this process (the load generator), tritonserver and its python stubs."""

    def __init__(self, server_pid: int):
        self.groups = {"client": [os.getpid()], "tritonserver": [server_pid],
                       "python stubs": [pid for pid, (ppid, _) in OtherLoad._table().items() if ppid == server_pid]}

    def snapshot(self) -> tuple[float, dict[str, int]]:
        return time.perf_counter(), {name: sum(_ticks(p) for p in pids) for name, pids in self.groups.items()}

    @staticmethod
    def between(a, b) -> dict[str, float]:
        seconds = b[0] - a[0]
        return {name: round((b[1][name] - a[1][name]) / os.sysconf("SC_CLK_TCK") / seconds, 2) for name in a[1]}


# --------------------------------------------------------------------------------------
# The model and the two designs
# --------------------------------------------------------------------------------------


def make_model(params: Params, resolution: int, work: Path):
    """An untrained generator of ``params.model``: (G, onnx path, safetensors path)."""
    from components.export import export_generator
    from model.checkpoint import save_generator
    from model.registry import build_networks

    G, _ = build_networks(params.model, len(CLASSES), 1, resolution, seed=0)
    G.eval().requires_grad_(False)
    meta = {"classes": CLASSES, "variant": params.model.variant, "data_md5": "benchmark", "params_digest": params.digest()}
    export_generator(G, meta, work / "generator.onnx", params.export)
    save_generator(work / "G.safetensors", G, {
        "classes": CLASSES, "variant": params.model.variant, "z_dim": G.z_dim, "img_resolution": resolution,
        "img_channels": 1, "data_md5": "bench", "params_digest": params.digest(),
    })
    return G, work / "generator.onnx", work / "G.safetensors"


FLAVOUR = {"name": "cpu"}                      # --flavour: which Triton flavour and ORT provider are measured
SERVE_OVERRIDES: dict = {}                     # --set serve.KEY=VALUE for every Triton started here


def ort_session(onnx_path: Path, threads: int):
    """An in-process session: CPU provider (cpu flavour) or CUDA (gpu flavour, the limit there)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if FLAVOUR["name"] == "gpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"--flavour gpu: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                             f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
        return ort.InferenceSession(str(onnx_path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _inputs(batch: int, z_dim: int) -> dict[str, np.ndarray]:
    return {"z": z_from_seed(1, batch, z_dim), "class": np.arange(batch, dtype=np.int64) % len(CLASSES)}


def measure_ort(onnx_path: Path, z_dim: int, cores: int, concurrency: list[int], batches: tuple[int, ...],
                duration: float) -> dict:
    """In-process ORT, each cell the best way to run it here: one image per call from ``c``
    threads with 1 or ``cores`` onnxruntime threads; a call of ``b`` images with 1 or ``cores``
    threads, or cut into ``cores`` slices run at once on a 1-thread session (data parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    sessions = {t: ort_session(onnx_path, t) for t in (sorted({1, cores}) if FLAVOUR["name"] == "cpu" else [1])}
    pool = ThreadPoolExecutor(cores)
    out: dict = {"single": {}, "batch": {}}
    for c in concurrency:
        cells = {}
        for threads, session in sessions.items():
            def call(i: int, session=session) -> None:
                session.run(["image"], {"z": z_from_seed(i, 1, z_dim), "class": np.array([i % len(CLASSES)], dtype=np.int64)})
            cells[threads] = run_threads(call, c, duration)
        best = min(cells, key=lambda t: cells[t]["p50_ms"]) if c == 1 else max(cells, key=lambda t: cells[t]["images_per_s"])
        out["single"][str(c)] = {**cells[best], "threads": best, "by_threads": {str(t): v["images_per_s"] for t, v in cells.items()}}
    for b in batches:
        feeds = _inputs(b, z_dim)
        cells = {str(t): batch_throughput(lambda s=s: s.run(["image"], feeds), b, duration) for t, s in sessions.items()}
        if FLAVOUR["name"] == "cpu" and cores > 1 and b >= cores:
            cuts = [b * k // cores for k in range(cores + 1)]
            slices = [{k: v[lo:hi] for k, v in feeds.items()} for lo, hi in zip(cuts, cuts[1:])]
            split = lambda: list(pool.map(lambda f: sessions[1].run(["image"], f), slices))  # noqa: E731
            cells[f"1/w{cores}"] = batch_throughput(split, b, duration)
        best = max(cells, key=lambda t: cells[t]["images_per_s"])
        out["batch"][str(b)] = {**cells[best], "threads": best, "by_threads": {t: v["images_per_s"] for t, v in cells.items()}}
    pool.shutdown()
    return out


@contextlib.contextmanager
def triton_server(onnx_path: Path, work: Path, profile: str, overrides: dict | None = None):
    """A tritonserver on free ports serving ``onnx_path`` with the profile's serve settings (+ overrides)."""
    from serving.repository import build_repository, plan
    from serving.server import TritonServer, free_port

    repo = work / "repo"
    values = {
        "serve.onnx": {MODEL: str(onnx_path)}, "serve.models": [MODEL], "serve.repository": str(repo),
        "serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port(),
        "serve.flavour": FLAVOUR["name"], **SERVE_OVERRIDES, **(overrides or {}),
    }
    tparams = load_params(ROOT / "params.yaml", profile=profile, overrides=values)
    build_repository(tparams)
    with TritonServer(tparams.serve, repo) as server:
        yield server, tparams, plan(tparams.serve)


def settings_of(tparams: Params, layout) -> dict:
    cfg = tparams.serve
    return {"instances": layout.instance_count, "threads": layout.intra_op_threads, "workers": layout.batch_workers,
            "max_queue_delay_us": cfg.max_queue_delay_us, "preferred_batch_sizes": list(cfg.preferred_batch_sizes),
            "max_batch_size": cfg.max_batch_size, "cpus": layout.cpus}


def _layout(s: dict) -> str:
    """instances x threads, with /wN when each batch is split over N workers."""
    return f"{s['instances']}x{s['threads']}" + (f"/w{s['workers']}" if s["workers"] > 1 else "")


def _label(s: dict) -> str:
    preferred = ",".join(map(str, s["preferred_batch_sizes"])) or "-"
    return f"{_layout(s):7s} delay {s['max_queue_delay_us']:>4d} us pref {preferred}"


# --------------------------------------------------------------------------------------
# Where the time of one request goes (Triton's statistics + the model's own counters)
# --------------------------------------------------------------------------------------


def server_counters(client, metrics_url: str) -> dict:
    """Triton's cumulative statistics for the model (ns) and the stub's ``radsynth_backend_*`` (us)."""
    stats = client._client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    out = {"count": 0, "executions": 0}
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        out[key + "_ns"] = 0
    for entry in stats:
        inference = entry.get("inference_stats", {})
        out["count"] += int(inference.get("success", {}).get("count", 0))
        out["executions"] += int(entry.get("execution_count", 0))
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            out[key + "_ns"] += int(inference.get(key, {}).get("ns", 0))
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for name in ("executions", "execute_us", "onnxruntime_us"):
        prefix = f"radsynth_backend_{name}_total{{"
        out["stub_" + name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                  if line.startswith(prefix) and f'model="{MODEL}"' in line)
    return out


def settled_counters(client, metrics_url: str, z_dim: int) -> dict:
    """``server_counters`` once the stub has pushed every execution: after a pause longer than
    its flush interval, one more 1-image request makes it flush (that request is in both
    Triton's statistics and the stub's counters, so the two stay comparable)."""
    time.sleep(0.25)
    client.infer(z_from_seed(0, 1, z_dim), [0])
    return server_counters(client, metrics_url)


def breakdown(before: dict, after: dict, client_mean_ms: float) -> dict:
    """Mean ms per request, from counter deltas (valid at c=1: one request per execution)."""
    d = {k: after[k] - before[k] for k in after}
    requests = max(d["count"], 1)
    per = lambda ns: ns / requests / 1e6  # noqa: E731
    if not d["stub_executions"]:  # gpu flavour: Triton's onnxruntime backend, no python stub
        d["stub_execute_us"] = d["stub_onnxruntime_us"] = d["compute_infer_ns"] / 1e3
    stub_runs = max(d["stub_executions"], 1)
    execute_ms = d["stub_execute_us"] / stub_runs / 1e3
    model_ms = d["stub_onnxruntime_us"] / stub_runs / 1e3
    server_ms = per(d["success_ns"])
    infer_ms = per(d["compute_infer_ns"])
    parts = {
        "client + gRPC (client latency - Triton request time)": client_mean_ms - server_ms,
        "Triton queue (dynamic batcher)": per(d["queue_ns"]),
        "Triton compute input": per(d["compute_input_ns"]),
        "python backend IPC (compute infer - stub execute)": infer_ms - execute_ms,
        "stub execute(): tensors in/out (execute - onnxruntime)": execute_ms - model_ms,
        "model: onnxruntime session.run": model_ms,
        "Triton compute output": per(d["compute_output_ns"]),
        "Triton other (request time - queue - compute)": server_ms - per(d["queue_ns"]) - per(d["compute_input_ns"]) - infer_ms - per(d["compute_output_ns"]),
    }
    return {"requests": d["count"], "executions": d["executions"], "client_mean_ms": client_mean_ms,
            "server_request_ms": server_ms, "parts_ms": parts}


def measure_triton(onnx_path: Path, z_dim: int, work: Path, profile: str, concurrency: list[int],
                   batches: tuple[int, ...], duration: float, generate_n: int) -> dict:
    from serving.client import Client

    out: dict = {"single": {}, "batch": {}}
    with triton_server(onnx_path, work, profile) as (server, tparams, layout):
        out["settings"] = settings_of(tparams, layout)
        out["plan"] = layout.describe()
        cores = CoresUsed(server.process.pid)
        with Client(server.grpc_url, timeout_s=300) as client:
            for c in concurrency:
                marks: dict = {}
                hooks = {"on_start": lambda: marks.update(before=server_counters(client, server.metrics_url), t0=cores.snapshot()),
                         "on_stop": lambda: marks.update(t1=cores.snapshot(), after=server_counters(client, server.metrics_url))}
                cell = triton_cell(server.grpc_url, z_dim, c, duration, **hooks)
                d = {k: marks["after"][k] - marks["before"][k] for k in ("count", "executions")}
                cell["mean_server_batch"] = d["count"] / max(d["executions"], 1)
                cell["cores"] = CoresUsed.between(marks["t0"], marks["t1"])
                if c == 1:
                    out["c1_breakdown"] = breakdown(marks["before"], settled_counters(client, server.metrics_url, z_dim), cell["mean_ms"])
                out["single"][str(c)] = cell
            if 1 in concurrency:  # the same c=1 cell through the project's blocking client (Client.infer)
                before = settled_counters(client, server.metrics_url, z_dim)
                cell = run_threads(lambda i: client.infer(z_from_seed(i, 1, z_dim), [i % len(CLASSES)]), 1, duration)
                # counters span the 0.5 s warm-up too: the breakdown's means still hold (every request alike)
                out["sync_c1"] = {**cell, "breakdown": breakdown(before, settled_counters(client, server.metrics_url, z_dim), cell["mean_ms"])}
            for b in batches:
                feeds = _inputs(b, z_dim)
                out["batch"][str(b)] = batch_throughput(lambda: client.infer(feeds["z"], feeds["class"]), b, duration)
            if generate_n:
                client.generate("NORMAL", 2 * client.images_per_request, seed=0)  # warm the client's pool path
                t0 = time.perf_counter()
                images = client.generate("NORMAL", generate_n, seed=1)
                elapsed = time.perf_counter() - t0
                out["generate"] = {"n": generate_n, "seconds": elapsed, "images_per_s": generate_n / elapsed,
                                   "images_per_request": client.images_per_request, "in_flight": client.in_flight,
                                   "shape": list(images.shape)}
    return out


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def layouts(cores: int) -> list[tuple[int, int, int]]:
    """(instances, threads, batch workers) to try, with ``T = min(cores, 4)``: one instance with
    T threads (and T workers for big batches), one 1-thread instance per core, and one instance
    per core with T threads for small batches and/or T workers for big ones (the rule)."""
    t = min(cores, 4)
    return sorted({(1, t, 1), (1, t, t), (cores, 1, 1), (cores, t, 1), (cores, 1, t), (cores, t, t)})


def _parse_layout(text: str) -> tuple[int, int, int]:
    """``2x1`` -> (2, 1, 1); ``2x1/w2`` -> (2, 1, 2)."""
    main, _, workers = text.partition("/w")
    instances, threads = main.split("x")
    return int(instances), int(threads), int(workers or 1)


def score(cell: dict, ort: dict) -> dict:
    """Each target as a margin (>= 1: met) and their minimum."""
    margins = {
        "c1_latency": 2.0 * ort["c1_p50_ms"] / cell["c1_p50_ms"],
        "c32": cell["c32_images_per_s"] / (0.9 * ort["c32_images_per_s"]),
        "batch64": cell["batch64_images_per_s"] / (0.9 * ort["batch64_images_per_s"]),
    }
    return {**{k: round(v, 3) for k, v in margins.items()}, "min": round(min(margins.values()), 3)}


def sweep(onnx_path: Path, z_dim: int, work: Path, profile: str, cores: int, duration: float, ort: dict,
          delays: list[int], preferred: list[tuple[int, ...]], grid: list[tuple[int, int]]) -> dict:
    from serving.client import Client

    points = []
    shipped = load_params(ROOT / "params.yaml", profile=profile).serve
    from serving.repository import plan

    chosen_layout = plan(shipped)
    key = (chosen_layout.instance_count, chosen_layout.intra_op_threads, chosen_layout.batch_workers,
           shipped.max_queue_delay_us, tuple(shipped.preferred_batch_sizes))
    combos = [(*layout, d, p) for layout, d, p in itertools.product(grid, delays, preferred)]
    if key not in combos:
        combos.append(key)
    print(f"sweep: {len(combos)} settings, {duration:g} s per cell", flush=True)
    for instances, threads, workers, delay, pref in combos:
        overrides = {"serve.instance_count": instances, "serve.intra_op_threads": threads, "serve.batch_workers": workers,
                     "serve.max_queue_delay_us": delay, "serve.preferred_batch_sizes": list(pref)}
        with triton_server(onnx_path, work, profile, overrides) as (server, tparams, layout):
            s = settings_of(tparams, layout)
            with Client(server.grpc_url, timeout_s=300) as client:
                c1 = triton_cell(server.grpc_url, z_dim, 1, duration, warmup=0.3)
                c32 = triton_cell(server.grpc_url, z_dim, 32, duration, warmup=0.3)
                feeds = _inputs(64, z_dim)
                b64 = batch_throughput(lambda: client.infer(feeds["z"], feeds["class"]), 64, duration)
        cell = {"c1_p50_ms": c1["p50_ms"], "c32_images_per_s": c32["images_per_s"], "batch64_images_per_s": b64["images_per_s"]}
        point = {"settings": s, **cell, "score": score(cell, ort), "chosen": (instances, threads, workers, delay, tuple(pref)) == key}
        points.append(point)
        print(f"  {_label(s):34s} c=1 p50 {cell['c1_p50_ms']:6.2f} ms  c=32 {cell['c32_images_per_s']:7.1f}/s  "
              f"b64 {cell['batch64_images_per_s']:7.1f}/s  margin {point['score']['min']:.2f}"
              + ("  (chosen)" if point["chosen"] else ""), flush=True)
    best = max(points, key=lambda p: p["score"]["min"])
    pick = next(p for p in points if p["chosen"])
    return {"ort": ort, "points": points, "best": best, "chosen": pick, "duration_s": duration}


# --------------------------------------------------------------------------------------
# PyTorch eager and the naive design (baselines)
# --------------------------------------------------------------------------------------


def measure_pytorch(G, z_dim: int, concurrency: list[int], duration: float) -> dict:
    import torch

    torch.set_num_threads(1)

    def call(i: int) -> None:
        with torch.no_grad():
            G(torch.from_numpy(z_from_seed(i, 1, z_dim)), torch.tensor([i % len(CLASSES)]))

    return {str(c): run_threads(call, c, duration) for c in concurrency}


def measure_naive(checkpoint: Path, concurrency: list[int], duration: float) -> dict:
    from serving.server import free_port

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RADSYNTH_NAIVE_G=str(checkpoint), RADSYNTH_NAIVE_THREADS="1")
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

        def call(i: int) -> None:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = json.dumps({"condition": CLASSES[i % len(CLASSES)], "seed": i, "n": 1})
            local.conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
            response = local.conn.getresponse()
            json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"naive endpoint answered {response.status}")

        return {"workers": workers, **{str(c): run_threads(call, c, duration) for c in concurrency}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def print_report(results: dict) -> None:
    ort, tri = results.get("ort"), results.get("triton")
    rows = [("ONNX Runtime in-process", ort), ("Triton gRPC", tri)]
    if ort or tri:
        print("\none image per request, c in flight")
        print(f"{'design':28s} {'c':>3s} {'p50 ms':>8s} {'p99 ms':>8s} {'images/s':>9s}")
        for name, part in rows + [("PyTorch eager in-process", {"single": results.get("pytorch")} if results.get("pytorch") else None),
                                  ("naive Flask + PyTorch", {"single": {k: v for k, v in results["naive"].items() if k != "workers"}} if results.get("naive") else None)]:
            for c, cell in (part or {}).get("single", {}).items():
                extra = f"  ({cell['threads']} thread(s))" if "threads" in cell else ""
                extra += f"  (mean server batch {cell['mean_server_batch']:.1f})" if "mean_server_batch" in cell else ""
                extra += "  cores: " + ", ".join(f"{k} {v:.2f}" for k, v in cell["cores"].items()) if "cores" in cell else ""
                print(f"{name:28s} {c:>3s} {cell['p50_ms']:8.2f} {cell['p99_ms']:8.2f} {cell['images_per_s']:9.1f}{extra}")
    if ort and tri:
        print("\none request of b images (images/s)")
        print(f"{'b':>3s} {'ORT in-process':>15s} {'Triton':>9s} {'ratio':>6s}")
        for b, cell in tri["batch"].items():
            o = ort["batch"][b]["images_per_s"]
            print(f"{b:>3s} {o:15.1f} {cell['images_per_s']:9.1f} {cell['images_per_s'] / o:6.2f}")
        r = results["ratios"]
        print(f"\nTriton / ORT: batch 64 {r['batch64']:.2f}x (target >= 0.9), c=32 {r['c32']:.2f}x (target >= 0.9), "
              f"c=1 p50 {r['c1_latency']:.2f}x ORT's (target <= 2)")
    if tri and "c1_breakdown" in tri:
        sync = tri.get("sync_c1", {}).get("breakdown")
        bd = tri["c1_breakdown"]
        print(f"\nwhere a c=1 request's time goes (mean ms; async_infer client over {bd['requests']} requests"
              + (f", blocking Client.infer over {sync['requests']}" if sync else "") + ")")
        for name, ms in bd["parts_ms"].items():
            print(f"  {ms:7.3f}" + (f" {sync['parts_ms'][name]:7.3f}" if sync else "") + f"  {name}")
        print(f"  {bd['client_mean_ms']:7.3f}" + (f" {sync['client_mean_ms']:7.3f}" if sync else "") + "  total (client-measured)")
        if sync:
            s1 = tri["sync_c1"]
            print(f"blocking Client.infer at c=1: p50 {s1['p50_ms']:.2f} ms, p99 {s1['p99_ms']:.2f} ms, {s1['images_per_s']:.1f} images/s")
    if tri and "generate" in tri:
        g = tri["generate"]
        limit = max(cell["images_per_s"] for cell in ort["batch"].values()) if ort else float("nan")
        print(f"\nClient.generate of {g['n']} images: {g['seconds']:.2f} s, {g['images_per_s']:.1f} images/s "
              f"({g['images_per_request']} per request, {g['in_flight']} in flight) = {g['images_per_s'] / limit:.2f}x "
              f"the in-process ORT limit ({limit:.1f} images/s)")
    if "sweep" in results:
        sw = results["sweep"]
        print("\nsweep (margin = min over targets of achieved/target; >= 1 meets all three)")
        for name in ("best", "chosen"):
            p = sw[name]
            print(f"  {name:6s} {_label(p['settings']):34s} c=1 p50 {p['c1_p50_ms']:.2f} ms, c=32 {p['c32_images_per_s']:.1f}/s, "
                  f"b64 {p['batch64_images_per_s']:.1f}/s, margins {p['score']}")
    print(f"\nother load during the run: {results['other_load']}")


def plot_batch_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ort, tri = results["ort"]["batch"], results["triton"]["batch"]
    sizes = [int(b) for b in ort]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(sizes, [ort[str(b)]["images_per_s"] for b in sizes], "o-", label="ONNX Runtime in-process")
    ax.plot(sizes, [tri[str(b)]["images_per_s"] for b in sizes if str(b) in tri], "s-", label=f"Triton gRPC ({results.get('flavour', 'cpu')} flavour)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("images per request (batch)")
    ax.set_ylabel("images / s")
    m = results["model"]
    ax.set_title(f"{m['variant']} {m['resolution']}x{m['resolution']}, {results['machine']['cpus']} cores, "
                 f"Triton {_layout(results['triton']['settings'])}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from radsynth.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: ORT in-process on the CUDA provider and Triton's gpu flavour (onnxruntime_onnx, KIND_GPU); "
                         "on gpu the breakdown's 'model' line is Triton's compute infer (no python stub)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="serve.* setting for every Triton started here, e.g. serve.tensorrt=true (repeatable)")
    ap.add_argument("--profile", default="cpu", help="params profile: model: section and shipped serve: settings (default cpu)")
    ap.add_argument("--variant", default="", help="model.variant to build (default: the profile's)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=["ort", "triton", "pytorch", "naive"])
    ap.add_argument("--generate", type=int, default=10_000, help="images in the one Client.generate call (0: skip)")
    ap.add_argument("--delays", type=int, nargs="+", default=[0, 500, 2000], help="sweep: max_queue_delay_us values")
    ap.add_argument("--preferred", nargs="+", default=["-", "8,16,32,64"], help="sweep: preferred batch sizes ('-': none)")
    ap.add_argument("--layouts", nargs="+", default=None,
                    help="sweep: instances x threads [/w batch workers], e.g. 1x2 2x1 2x1/w2 (default: from the cores)")
    ap.add_argument("--plot", type=Path, default=None, help="write the batch curve (ORT vs Triton) as PNG here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = ap.parse_args()
    FLAVOUR["name"] = args.flavour
    from radsynth.config import ConfigError, parse_override

    try:
        SERVE_OVERRIDES.update(parse_override(text) for text in args.overrides)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if any(not key.startswith("serve.") for key in SERVE_OVERRIDES):
        raise SystemExit("--set: only serve.* keys (the model is built from the profile)")

    import onnxruntime as ort
    import torch

    from serving.repository import available_cpus

    params = load_params(ROOT / "params.yaml", profile=args.profile,
                         overrides={"model.variant": args.variant} if args.variant else None)
    cores = available_cpus()
    work = Path(tempfile.mkdtemp(prefix="radsynth-bench-"))
    G, onnx_path, checkpoint = make_model(params, args.resolution, work)
    z_dim = int(G.z_dim)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": {"variant": params.model.variant, "profile": args.profile, "resolution": args.resolution, "z_dim": z_dim,
                  "parameters": int(sum(p.numel() for p in G.parameters()))},
        "machine": {"cpus": cores, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "duration_s": args.duration, "flavour": args.flavour,
    }
    print(f"model {params.model.variant} {args.resolution}x{args.resolution}, z_dim {z_dim}, "
          f"{results['model']['parameters'] / 1e6:.2f} M parameters; {cores} cores", flush=True)
    try:
        with OtherLoad() as load:
            if "ort" in args.parts or "sweep" in args.parts:
                batches = tuple(args.batches) if "ort" in args.parts else (64,)
                conc = args.concurrency if "ort" in args.parts else [1, 32]
                results["ort"] = measure_ort(onnx_path, z_dim, cores, conc, batches, args.duration)
                print("onnxruntime in-process measured", flush=True)
            if "triton" in args.parts:
                results["triton"] = measure_triton(onnx_path, z_dim, work, args.profile, args.concurrency, tuple(args.batches),
                                                   args.duration, args.generate)
                print(f"triton measured ({results['triton']['plan']})", flush=True)
            if "sweep" in args.parts:
                o = results["ort"]
                baseline = {"c1_p50_ms": o["single"]["1"]["p50_ms"], "c32_images_per_s": o["single"]["32"]["images_per_s"],
                            "batch64_images_per_s": o["batch"]["64"]["images_per_s"]}
                grid = [_parse_layout(item) for item in args.layouts] if args.layouts else layouts(cores)
                preferred = [() if p == "-" else tuple(int(x) for x in p.split(",")) for p in args.preferred]
                results["sweep"] = sweep(onnx_path, z_dim, work, args.profile, cores, args.duration, baseline,
                                         args.delays, preferred, grid)
            if "pytorch" in args.parts:
                results["pytorch"] = measure_pytorch(G, z_dim, args.concurrency, args.duration)
            if "naive" in args.parts:
                results["naive"] = measure_naive(checkpoint, args.concurrency, args.duration)
        results["other_load"] = load.summary()
        if results.get("ort") and results.get("triton"):
            o, t = results["ort"], results["triton"]
            results["ratios"] = {
                "batch64": t["batch"]["64"]["images_per_s"] / o["batch"]["64"]["images_per_s"],
                "c32": t["single"]["32"]["images_per_s"] / o["single"]["32"]["images_per_s"],
                "c1_latency": t["single"]["1"]["p50_ms"] / o["single"]["1"]["p50_ms"],
            }
            if results.get("naive"):
                results["ratios"]["triton_vs_naive_c32"] = t["single"]["32"]["images_per_s"] / results["naive"]["32"]["images_per_s"]
        print_report(results)
        from radsynth.io import write_json

        write_json(args.out, results)
        print(f"wrote {args.out}")
        if args.plot and results.get("ort") and results.get("triton"):
            plot_batch_curve(results, args.plot)
            print(f"wrote {args.plot}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
