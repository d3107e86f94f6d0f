"""Against ONE real tritonserver (session fixture): parity, batching, warm-up, chunked generate, errors, CLI."""

from __future__ import annotations

import json
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
    _latent_stream,
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
    with Client.from_params(registry_params, protocol="http") as http:
        assert http.info.classes == client.info.classes
        np.testing.assert_array_equal(http.generate("COVID", 3, seed=11), client.generate("COVID", 3, seed=11))
        assert http.in_flight == 1                                              # one request at a time over HTTP
        np.testing.assert_array_equal(http.generate("COVID", 20, seed=11), client.generate("COVID", 20, seed=11))


def test_latent_stream_concatenates_to_z_from_seed():
    draw = _latent_stream(42, 16)
    chunks = [draw(k) for k in (1, 7, 16, 3)]                                  # [k, 16] each
    np.testing.assert_array_equal(np.concatenate(chunks), z_from_seed(42, 27, 16))
    with pytest.raises(InvalidInputError, match="seed must be an integer"):
        _latent_stream(-1, 16)


class _Recording(Client):
    """The real client, counting concurrent requests; the first ``hold`` requests wait for each
    other, so the test fails (BrokenBarrierError) unless that many really are in flight at once."""

    def __init__(self, *args, hold: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes, self.active, self.peak = [], 0, 0
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(hold, timeout=20) if hold > 1 else None

    def _infer_raw(self, z, labels):
        with self._lock:
            self.sizes.append(z.shape[0])
            self.active += 1
            self.peak = max(self.peak, self.active)
            first = len(self.sizes) <= (self._barrier.parties if self._barrier else 0)
        try:
            if first:
                self._barrier.wait()
            return super()._infer_raw(z, labels)
        finally:
            with self._lock:
                self.active -= 1


def test_generate_any_n_is_chunked_and_independent_of_the_chunking(triton, client):
    """n above the model's max batch (16): split into requests, several in flight, at most
    max_in_flight; the images for a seed do not depend on the chunk size or the concurrency."""
    n, seed = 37, 5
    reference = to_uint8(np.concatenate([client.infer(z, np.full(len(z), 1)) for z in np.split(z_from_seed(seed, n, client.info.z_dim), [16, 32])]))
    default = client.generate("PNEUMONIA", n, seed=seed)                       # 16 per request, 2 per instance in flight
    assert client.images_per_request == 16 and client.in_flight == 2 * client.info.instances
    with _Recording(triton.grpc_url, max_images_per_call=5, max_in_flight=3, hold=3) as small:
        chunked = small.generate("PNEUMONIA", n, seed=seed)
        assert small.sizes == [5] * 7 + [2] and small.peak == 3                 # 8 requests, exactly 3 at once at most
    with _Recording(triton.grpc_url, max_in_flight=1) as serial:
        one_by_one = serial.generate("PNEUMONIA", n, seed=seed)
        assert serial.sizes == [16, 16, 5] and serial.peak == 1
    assert default.shape == (n, 16, 16, 1)
    for images in (default, chunked, one_by_one):
        np.testing.assert_array_equal(images, reference)
    np.testing.assert_array_equal(client.generate("PNEUMONIA", 10, seed=seed), reference[:10])  # a prefix is the same
    streamed = list(client.iter_generate("PNEUMONIA", n, seed))
    assert [start for start, _ in streamed] == [0, 16, 32]
    np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in streamed]), reference)
    with pytest.raises(InvalidInputError, match="n must be a positive integer"):
        client.generate("NORMAL", 0)


def test_warmup_ran_when_the_models_loaded(triton):
    """model_warmup: batch 1 and max batch (16) once per instance, before the first request."""
    instances = json.loads((triton.repository / "repository.json").read_text())["plan"]["instance_count"]
    assert triton.ready_statistics == {"inference_count": instances * (1 + 16), "execution_count": instances * 2}


def settled_statistics(client, pause_s: float = 0.1, reads: int = 50) -> dict:
    """Triton's counters once two reads agree: a request is counted just after its answer
    is sent, so a read right after another test's last call can miss that call's images."""
    last = client.statistics()
    for _ in range(reads):
        time.sleep(pause_s)
        now = client.statistics()
        if now == last:
            return now
        last = now
    return last


def test_64_concurrent_single_image_requests_are_batched(client):
    before = settled_statistics(client)
    start = threading.Barrier(64)
    z = z_from_seed(123, 64, client.info.z_dim)                                 # [64, z_dim]
    labels = np.arange(64) % len(CLASSES)

    def one(i: int) -> np.ndarray:
        start.wait()
        return client.infer(z[i:i + 1], labels[i:i + 1])                        # [1, 1, 16, 16]

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    after = settled_statistics(client)
    images = np.concatenate(results)
    expected = np.concatenate([client.infer(z[i:i + 16], labels[i:i + 16]) for i in range(0, 64, 16)])
    np.testing.assert_allclose(images, expected, atol=ATOL)                     # each answer is its own request's
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 64
    assert executions < inferences, f"no batching: {executions} executions for {inferences} requests"


def test_metrics_port_exports_prometheus_counters(client, triton):
    client.generate("NORMAL", 2, seed=3)
    time.sleep(0.25)                                                            # the stub pushes its counters every 0.2 s,
    client.generate("NORMAL", 2, seed=4)                                        # at the next execution
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("nv_inference_count{", "nv_inference_exec_count{", "radsynth_backend_")) and f'model="{MODEL}"' in line:
            name = line.split("{")[0]
            counts[name] = counts.get(name, 0.0) + float(line.rsplit(" ", 1)[1])  # summed over instances
    assert counts["nv_inference_count"] >= 2 and counts["nv_inference_exec_count"] >= 1
    assert counts["radsynth_backend_executions_total"] >= 1                     # the python stub's own timing
    assert 0 < counts["radsynth_backend_onnxruntime_us_total"] < counts["radsynth_backend_execute_us_total"]


def test_clear_client_errors(client, triton):
    with pytest.raises(UnknownConditionError, match="valid conditions: NORMAL, PNEUMONIA, COVID"):
        client.generate("CARDIOMEGALY")
    with pytest.raises(TooManyImagesError, match=r"17 images in one call; allowed 1\.\.16"):
        client.infer(np.zeros((17, client.info.z_dim), np.float32), np.zeros(17, np.int64))
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
    done = _cli("generate", "--profile", "tiny", "--url", url, "--condition", "PNEUMONIA", "-n", "20", "--seed", "7",
                "--out", str(tmp_path / "png"))                                 # 20 > the model's max batch (16)
    assert done.returncode == 0, done.stderr
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"PNEUMONIA_7_{i:03d}.png" for i in range(20)]
    with Client(url) as c:
        expected = c.generate("PNEUMONIA", 20, seed=7)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs])[..., None], expected)
    assert json.loads((tmp_path / "png" / "generate_PNEUMONIA_7.json").read_text())["n"] == 20

    done = _cli("generate", "--profile", "tiny", "--url", url, "--condition", "COVID", "-n", "18", "--seed", "9",
                "--out", str(tmp_path / "dcm"), "--format", "dicom")
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    series = [pydicom.dcmread(f) for f in files]
    ds = series[1]
    assert ds.PatientName == "SYNTHETIC^RADSYNTH" and "seed 9" in ds.ImageComments and ds.InstanceNumber == 2
    assert ds.pixel_array.shape == (16, 16)
    assert sorted(d.InstanceNumber for d in series) == list(range(1, 19))       # numbering continues across chunks
    assert len({(d.StudyInstanceUID, d.SeriesInstanceUID) for d in series}) == 1  # one series

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


def test_every_way_of_running_a_batch_keeps_every_answer(tiny, tmp_path):
    """A server whose instances run batches of <= 2 on 2 threads, of >= 8 cut into 3 slices run
    at once, others on 1 thread: the same images as onnxruntime on each path, also for
    concurrent requests merged into one batch."""
    from serving.repository import repository_from_onnx
    from serving.server import TritonServer
    from tests.serving.conftest import serving_params

    params = serving_params(tmp_path, **{"serve.warmup": False})
    repo = repository_from_onnx(params, tiny[1], tmp_path / "repo", flavour="cpu", instance_count=2, batch_workers=3,
                                intra_op_threads=2, max_queue_delay_us=200_000, preferred_batch_sizes=())
    # no preferred size: the batcher holds requests up to 0.2 s or until 16 images (four requests of 4) are queued
    session = ort.InferenceSession(str(tiny[1]), providers=["CPUExecutionProvider"])
    with TritonServer(params.serve, repo) as server, Client(server.grpc_url) as c:
        z = z_from_seed(11, 16, c.info.z_dim)                                  # [16, z_dim]
        labels = np.arange(16) % len(CLASSES)
        expected = session.run(["image"], {"z": z, "class": labels})[0]
        for n in (1, 2, 3, 7, 8, 16):                                          # threaded, 1 thread, sliced
            np.testing.assert_allclose(c.infer(z[:n], labels[:n]), expected[:n], atol=ATOL)
        start = threading.Barrier(4)

        def one(i: int) -> np.ndarray:
            start.wait()
            return c.infer(z[4 * i:4 * i + 4], labels[4 * i:4 * i + 4])

        before = c.statistics()
        with ThreadPoolExecutor(4) as pool:
            merged = np.concatenate(list(pool.map(one, range(4))))
        after = c.statistics()
        np.testing.assert_allclose(merged, expected, atol=ATOL)                 # each request gets its own rows back
        assert after["execution_count"] - before["execution_count"] < 4          # at least two requests shared a batch
