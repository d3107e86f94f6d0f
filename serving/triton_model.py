"""Triton python-backend model that runs an ONNX file with ONNX Runtime (the CPU flavour).

The repository builder copies this file to ``<repo>/<model>/<version>/model.py`` next to
``model.onnx``. It is generic: tensor names come from the model's ``config.pbtxt``, so the
generator, the encoder and the classifier all use it. It runs inside Triton's python stub,
so it imports only numpy, onnxruntime and ``triton_python_backend_utils``.

All requests of one dynamic batch are concatenated and run as ONE onnxruntime call, then
split back per request: that is what makes Triton's dynamic batching pay off on CPU.
"""

import json
import os
import sys

# The python stub's interpreter is isolated (ignores PYTHONPATH); the launcher names the
# serving environment's site-packages here (serving/server.py PYTHONPATH_ENV).
sys.path[:0] = [p for p in os.environ.get("RADSYNTH_TRITON_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"])
        onnx_inputs = {i.name: i for i in self.session.get_inputs()}
        # name, numpy dtype, rank expected by the ONNX graph (including the batch axis)
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"]), len(onnx_inputs[t["name"]].shape))
            for t in config["input"]
        ]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]

    def execute(self, requests: list) -> list:
        batch: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in self.inputs}
        sizes = []
        for request in requests:
            for name, dtype, rank in self.inputs:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(dtype, copy=False)
                if rank == 1 and array.ndim != 1:  # class arrives as [N, 1] for the ONNX input [N]
                    array = array.reshape(-1)
                batch[name].append(array)
            sizes.append(batch[self.inputs[0][0]][-1].shape[0])
        feeds = {name: np.concatenate(parts, axis=0) for name, parts in batch.items()}
        results = self.session.run([name for name, _ in self.outputs], feeds)
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(result[start:start + size]).astype(dtype, copy=False))
                for (name, dtype), result in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
