"""Triton python-backend model that runs an ONNX file with ONNX Runtime (the CPU flavour).

The repository builder copies this file to ``<repo>/<model>/<version>/model.py`` next to
``model.onnx``. It is generic: tensor names come from the model's ``config.pbtxt``, so the
generator, the encoder and the classifier all use it. It runs inside Triton's python stub,
so it imports only numpy, onnxruntime and ``triton_python_backend_utils``.

All requests of one dynamic batch are concatenated and run as ONE onnxruntime call, then
split back per request: that is what makes Triton's dynamic batching pay off on CPU.

How a batch of ``b`` images runs depends on ``b`` (config parameters rendered by
``serving/repository.py`` from the plan, itself derived from the cores Triton is given):

- ``b <= small_batch``: on a session with ``intra_op_threads`` threads (no spinning), so a lone
  request uses several cores (latency; a small batch means the server is not busy);
- ``b >= split_batch``: cut into ``batch_workers`` slices run at once on a 1-thread session, each
  on its own thread (session.run releases the GIL): data parallelism, which these small
  convolutions use better than operator threads;
- otherwise on the 1-thread session: under load every instance keeps one core busy.

Where the time goes inside the stub is exported as Prometheus counters on Triton's metrics
port (labels ``model``, ``version``, ``instance``): ``radsynth_backend_executions_total``,
``radsynth_backend_execute_us_total`` (all of ``execute``: tensors in, onnxruntime, tensors
out) and ``radsynth_backend_onnxruntime_us_total`` (the ``session.run`` calls alone). They are
flushed every ``FLUSH_NS`` (a metric update is a message to the server) and at unload.
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# The python stub's interpreter is isolated (ignores PYTHONPATH); the launcher names the
# serving environment's site-packages here (serving/server.py PYTHONPATH_ENV).
sys.path[:0] = [p for p in os.environ.get("RADSYNTH_TRITON_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

FLUSH_NS = 200_000_000                         # push the timing counters at most every 0.2 s


class _Timing:
    """Per-instance sums of execute / onnxruntime time, pushed to Triton's custom metrics."""

    def __init__(self, labels: dict):
        kind = pb_utils.MetricFamily.COUNTER
        self._families = [  # kept alive: a Metric must not outlive its family
            pb_utils.MetricFamily(name="radsynth_backend_executions_total", description="model executions (batches) in the python stub", kind=kind),
            pb_utils.MetricFamily(name="radsynth_backend_execute_us_total", description="time in execute(): tensors in, onnxruntime, tensors out", kind=kind),
            pb_utils.MetricFamily(name="radsynth_backend_onnxruntime_us_total", description="time in onnxruntime session.run", kind=kind),
        ]
        self._metrics = [family.Metric(labels=labels) for family in self._families]
        self._pending = [0, 0, 0]              # executions, execute ns, onnxruntime ns
        self._last = time.monotonic_ns()

    def add(self, execute_ns: int, onnxruntime_ns: int) -> None:
        self._pending[0] += 1
        self._pending[1] += execute_ns
        self._pending[2] += onnxruntime_ns
        if time.monotonic_ns() - self._last >= FLUSH_NS:
            self.flush()

    def flush(self) -> None:
        executions, execute_ns, onnxruntime_ns = self._pending
        if executions:
            self._metrics[0].increment(executions)
            self._metrics[1].increment(execute_ns / 1000.0)
            self._metrics[2].increment(onnxruntime_ns / 1000.0)
        self._pending = [0, 0, 0]
        self._last = time.monotonic_ns()


def _session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if threads > 1:  # idle pool threads sleep instead of spinning on cores other instances use
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    """A 1-thread onnxruntime session per model instance, plus a threaded one for small batches."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        number = lambda key, default: max(int(params.get(key, "") or default), 1)  # noqa: E731
        threads = number("intra_op_threads", 1)
        self.workers = number("batch_workers", 1)
        self.small_batch = number("small_batch", 1)
        self.split_batch = number("split_batch", 2**31)
        self.session = _session(path, 1)
        self.threaded = _session(path, threads) if threads > 1 else None
        self.pool = ThreadPoolExecutor(self.workers - 1) if self.workers > 1 else None
        onnx_inputs = {i.name: i for i in self.session.get_inputs()}
        # name, numpy dtype, rank expected by the ONNX graph (including the batch axis)
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"]), len(onnx_inputs[t["name"]].shape))
            for t in config["input"]
        ]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]
        self.output_names = [name for name, _ in self.outputs]
        self.timing = _Timing({"model": args["model_name"], "version": args["model_version"], "instance": args["model_instance_name"]})

    def _array(self, request, name: str, dtype, rank: int) -> np.ndarray:
        array = pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
        if rank == 1 and array.ndim != 1:  # class arrives as [N, 1] for the ONNX input [N]
            array = array.reshape(-1)
        return array

    def execute(self, requests: list) -> list:
        start = time.perf_counter_ns()
        if len(requests) == 1:  # nothing to concatenate or split
            feeds = {name: self._array(requests[0], name, dtype, rank) for name, dtype, rank in self.inputs}
            sizes = [feeds[self.inputs[0][0]].shape[0]]
        else:
            parts = [{name: self._array(r, name, dtype, rank) for name, dtype, rank in self.inputs} for r in requests]
            sizes = [p[self.inputs[0][0]].shape[0] for p in parts]
            feeds = {name: np.concatenate([p[name] for p in parts], axis=0) for name, _, _ in self.inputs}
        run_start = time.perf_counter_ns()
        results = self._run(feeds, sum(sizes))
        run_ns = time.perf_counter_ns() - run_start
        responses = []
        offset = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[offset:offset + size]).astype(dtype, copy=False))
                for (name, dtype), result in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += size
        self.timing.add(time.perf_counter_ns() - start, run_ns)
        return responses

    def _run(self, feeds: dict, total: int) -> list:
        """``total`` images on the threaded session, the 1-thread one, or sliced over ``workers``."""
        if self.threaded is not None and total <= self.small_batch:
            return self.threaded.run(self.output_names, feeds)
        if self.pool is None or total < max(self.split_batch, self.workers):
            return self.session.run(self.output_names, feeds)
        cuts = [total * k // self.workers for k in range(self.workers + 1)]
        slices = [{name: array[a:b] for name, array in feeds.items()} for a, b in zip(cuts, cuts[1:])]
        futures = [self.pool.submit(self.session.run, self.output_names, part) for part in slices[1:]]
        first = self.session.run(self.output_names, slices[0])  # this thread takes a slice too
        parts = [first] + [f.result() for f in futures]
        return [np.concatenate([part[i] for part in parts], axis=0) for i in range(len(self.output_names))]

    def finalize(self) -> None:
        self.timing.flush()
        if self.pool is not None:
            self.pool.shutdown()
        self.session = self.threaded = None
