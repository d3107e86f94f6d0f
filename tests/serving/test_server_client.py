"""Against ONE real tritonserver (session fixture): parity, batching, errors, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch

from radsynth.latent import z_from_seed
from serving.client import (
    Client,
    InvalidInputError,
    ModelNotReadyError,
    ServerUnavailableError,
    TooManyImagesError,
    UnknownConditionError,
    to_uint8,
)
from serving.server import free_port
from tests.conftest import ROOT
from tests.serving.conftest import CLASSES, MODEL

ATOL = 1e-5


def test_triton_equals_onnxruntime_equals_pytorch(client, tiny):
    G, onnx_path = tiny
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert client.classes == tuple(CLASSES)                                     # from the server, not hard-coded
    for index, condition in enumerate(CLASSES):
        seed, n = 7 + index, 4
        z = z_from_seed(seed, n, client.info.z_dim)                             # [n, z_dim]
        c = np.full(n, index, dtype=np.int64)                                   # [n]
        triton = client.infer(z, c)                                             # [n, 1, 16, 16]
        onnx_out = session.run(["image"], {"z": z, "class": c})[0]
        with torch.no_grad():
            torch_out = G(torch.from_numpy(z), torch.from_numpy(c)).numpy()
        assert triton.shape == (n, 1, 16, 16) and triton.dtype == np.float32
        np.testing.assert_allclose(triton, onnx_out, atol=ATOL)
        np.testing.assert_allclose(triton, torch_out, atol=ATOL)
        images = client.generate(condition, n=n, seed=seed)                     # uint8 [n, H, W, C]
        assert images.shape == (n, 16, 16, 1) and images.dtype == np.uint8
        assert np.abs(images.astype(int) - to_uint8(torch_out).astype(int)).max() <= 1
    assert not np.array_equal(client.generate("NORMAL", 1, seed=1), client.generate("PNEUMONIA", 1, seed=1))


def test_other_models_are_served_beside_the_generator(client, classifier):
    """The classifier (image -> logits) runs through the same generic python model."""
    model, onnx_path = classifier
    images = client.infer(z_from_seed(3, 5, client.info.z_dim), np.arange(5) % 3)       # [5, 1, 16, 16]
    logits = client.run("radsynth-classifier", {"image": images}, ["logits"])["logits"]  # [5, 3]
    expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": images})[0]
    assert logits.shape == (5, 3)
    np.testing.assert_allclose(logits, expected, atol=ATOL)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(images.copy())).numpy(), atol=1e-4)


def test_http_gives_the_same_images(triton, registry_params, client):
    with Client.from_config(registry_params.serve, protocol="http") as http:
        assert http.info.classes == client.info.classes
        np.testing.assert_array_equal(http.generate("COVID", 3, seed=11), client.generate("COVID", 3, seed=11))


def test_64_concurrent_single_image_requests_are_batched(client):
    before = client.statistics()
    start = threading.Barrier(64)
    z = z_from_seed(123, 64, client.info.z_dim)                                 # [64, z_dim]
    labels = np.arange(64) % len(CLASSES)

    def one(i: int) -> np.ndarray:
        start.wait()
        return client.infer(z[i:i + 1], labels[i:i + 1])                        # [1, 1, 16, 16]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    after = client.statistics()
    images = np.concatenate(results)
    expected = np.concatenate([client.infer(z[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)])
    np.testing.assert_allclose(images, expected, atol=ATOL)                     # each answer is its own request's
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 64
    assert executions < inferences, f"no batching: {executions} executions for {inferences} requests"


def test_metrics_port_exports_prometheus_counters(client, triton):
    client.generate("NORMAL", 2, seed=3)
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("nv_inference_count{", "nv_inference_exec_count{")) and f'model="{MODEL}"' in line}
    assert counts["nv_inference_count"] >= 2 and counts["nv_inference_exec_count"] >= 1


def test_clear_client_errors(client, triton):
    with pytest.raises(UnknownConditionError, match="valid conditions: NORMAL, PNEUMONIA, COVID"):
        client.generate("CARDIOMEGALY")
    with pytest.raises(TooManyImagesError, match="at most 16"):
        client.generate("NORMAL", n=17)
    z_dim = client.info.z_dim
    with pytest.raises(InvalidInputError, match=rf"z must be \[N, {z_dim}\]"):
        client.infer(np.zeros((2, 5), np.float32), [0, 1])
    with pytest.raises(InvalidInputError, match="class must be"):
        client.infer(np.zeros((2, z_dim), np.float32), [0, 1, 2])
    # the same mistakes sent unchecked are refused by the server, with its reason relayed
    with pytest.raises(InvalidInputError, match="unexpected shape for input 'z'"):
        client._infer_raw(np.zeros((2, 5), np.float32), np.zeros((2, 1), np.int64))
    with pytest.raises(InvalidInputError, match="batch size does not match"):
        client._infer_raw(np.zeros((2, z_dim), np.float32), np.zeros((3, 1), np.int64))
    with pytest.raises(ModelNotReadyError, match="radsynth-generator v1 READY"):
        Client(triton.grpc_url, model_name="radsynth-encoder", retries=0).info


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_down_is_clear_after_retries(protocol):
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"did not answer .* after 3 attempts.*radsynth serve"):
        Client(url, protocol, retries=2, backoff_s=0.05, timeout_s=2).generate("NORMAL")
    assert time.monotonic() - started >= 0.15                                   # backed off 0.05 + 0.1


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MLFLOW_ENABLE_TELEMETRY": "false",
           **{k: v for k, v in os.environ.items() if k.startswith("RADSYNTH_TRITON_")}}  # the server's API keys
    return subprocess.run([sys.executable, "-m", "radsynth.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_cli_png_dicom_and_check(triton, tmp_path):
    import pydicom
    from PIL import Image

    url = triton.grpc_url
    done = _cli("generate", "--profile", "tiny", "--url", url, "--condition", "PNEUMONIA", "-n", "3", "--seed", "7",
                "--out", str(tmp_path / "png"))
    assert done.returncode == 0, done.stderr
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"PNEUMONIA_7_{i:03d}.png" for i in range(3)]
    with Client(url) as c:
        expected = c.generate("PNEUMONIA", 3, seed=7)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs])[..., None], expected)

    done = _cli("generate", "--profile", "tiny", "--url", url, "--condition", "COVID", "-n", "2", "--seed", "9",
                "--out", str(tmp_path / "dcm"), "--format", "dicom")
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    ds = pydicom.dcmread(files[1])
    assert ds.PatientName == "SYNTHETIC^RADSYNTH" and "seed 9" in ds.ImageComments and ds.InstanceNumber == 2
    assert ds.pixel_array.shape == (16, 16)

    done = _cli("generate", "--profile", "tiny", "--url", url, "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "13/13 checks passed" in done.stdout

    done = _cli("generate", "--profile", "tiny", "--url", f"127.0.0.1:{free_port()}", "--check", "--set", "serve.retries=0")
    assert done.returncode == 1 and "FAIL  server" in done.stdout

    done = _cli("generate", "--profile", "tiny", "--url", url, "--condition", "nope", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "valid conditions: NORMAL, PNEUMONIA, COVID" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()


def test_serve_cli_starts_and_stops_cleanly_on_sigterm(triton, tmp_path):
    ports = [free_port() for _ in range(3)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MLFLOW_ENABLE_TELEMETRY": "false",
           **{k: v for k, v in os.environ.items() if k.startswith("RADSYNTH_TRITON_")}}  # the server's API keys
    proc = subprocess.Popen(
        [sys.executable, "-m", "radsynth.cli", "serve", "--profile", "tiny", "--no-build",
         "--repository", str(triton.repository),
         "--set", f"serve.http_port={ports[0]}", "--set", f"serve.grpc_port={ports[1]}", "--set", f"serve.metrics_port={ports[2]}"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        assert "tritonserver ready" in line, line + proc.stderr.read()
        with Client(f"127.0.0.1:{ports[1]}") as c:
            assert c.generate("NORMAL", 1, seed=5).shape == (1, 16, 16, 1)
        proc.terminate()                                                        # SIGTERM
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "tritonserver stopped (code 0)" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ServerUnavailableError):
        Client(f"127.0.0.1:{ports[1]}", retries=0).info
