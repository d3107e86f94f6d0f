"""The web stack as the browser tests and the web benchmarks run it, started in one place.

- :func:`pipeline`: artefacts and a registry as the pipeline leaves them, for tiny untrained
  models (the real export, encoder, register and promote; only the evaluation's output files
  are written by hand, with numbers chosen here, because a full evaluation takes minutes).
- :func:`web_server`: ``radsynth web`` (gunicorn) on a free loopback port, stopped on exit.
- :func:`serving_stack`: both, with a real tritonserver serving generator, encoder and
  classifier from that registry (Triton and gunicorn start side by side).

Used by ``test_e2e.py``, ``test_study_e2e.py``, ``benchmarks/web.py`` and ``benchmarks/soak.py``;
waiting for a URL is :func:`pipelines.demo.wait_http` (the demo's own wait, which gives up
early when the process dies), and stopping a process group is the demo's too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import numpy as np

from radsynth import metric_keys as mk

from .conftest import CLASSES, ROOT

if TYPE_CHECKING:
    from radsynth.config import Params
    from serving.server import TritonServer

METRICS = {mk.FID_DOMAIN: 38.2, mk.FID_DOMAIN + mk.REF_SUFFIX: 4.1, mk.KID_DOMAIN: 0.027, mk.PRECISION: 0.64,
           mk.RECALL: 0.51, mk.COND_ACC: 0.81, mk.REAL_ACC: 0.92, mk.MEMORISATION_SHARE: 0.0,
           mk.per_class(mk.COND_ACC, "PNEUMONIA_VIRAL"): 0.77}
UNAVAILABLE = {mk.FID_INCEPTION: "InceptionV3 weights file not present (offline machine)",
               mk.KID_INCEPTION: "InceptionV3 weights file not present (offline machine)"}


def free_port() -> int:
    from serving.server import free_port as pick

    return pick()


def pipeline(tmp: Path) -> "Params":
    """Artefacts and registry as the pipeline leaves them, for tiny untrained models."""
    import torch

    from components.encoder import encoder
    from components.export import export_generator
    from components.register import promote, register
    from model.checkpoint import save_generator
    from model.classifier import ClassifierSpec, DomainClassifier, export_classifier_onnx
    from model.registry import build_networks
    from radsynth.config import load_params
    from radsynth.dataset import save_dataset, to_uint8
    from radsynth.io import write_json
    from radsynth.latent import z_from_seed

    art = tmp / "artifacts"
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    grpc = free_port()
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={
        "paths.artifacts": str(art), "paths.mlflow_uri": uri, "paths.mlflow_artifacts": str(tmp / "mlruns" / "artifacts"),
        "serve.models": ["radsynth-generator", "radsynth-encoder", "radsynth-classifier"],
        "serve.onnx": {"radsynth-encoder": str(art / "encoder" / "encoder.onnx")},
        "serve.repository": str(tmp / "model_repository"),
        "serve.grpc_port": grpc, "serve.http_port": free_port(), "serve.metrics_port": free_port(),
        "web.triton_url": f"127.0.0.1:{grpc}", "web.audit_log": str(tmp / "audit.jsonl"),
        "encoder.steps": 30, "web.max_images": 4,
    })
    torch.set_num_threads(1)
    G, _ = build_networks(params.model, len(CLASSES), 1, 16, seed=0)
    G.eval().requires_grad_(False)
    meta = {"classes": list(CLASSES), "data_md5": "e2e", "params_digest": params.digest(), "variant": G.variant}
    save_generator(art / "train" / "G_ema.safetensors", G, meta)
    c = np.arange(90, dtype=np.int64) % len(CLASSES)
    with torch.no_grad():
        x = to_uint8(G(torch.from_numpy(z_from_seed(1, 90, G.z_dim)), torch.from_numpy(c)).numpy())
    levels = {16: x, 8: x.reshape(90, 1, 8, 2, 8, 2).mean(axis=(3, 5)).astype(np.uint8)}
    save_dataset(art / "dataset", levels, [f"p{i}" for i in range(90)], c, ["train"] * 60 + ["val"] * 20 + ["test"] * 10, CLASSES)

    record = export_generator(G, meta, art / "export" / "generator.onnx", params.export)
    write_json(art / "export" / "export.json", record)
    torch.manual_seed(0)
    clf = DomainClassifier(ClassifierSpec(num_classes=len(CLASSES), img_channels=1, img_resolution=16, width=8)).eval()
    export_classifier_onnx(clf, art / "evaluate" / "classifier.onnx", CLASSES)
    write_json(art / "evaluate" / "metrics.json", METRICS)
    write_json(art / "evaluate" / "gate.json", {"passed": True, "failed": []})
    write_json(art / "evaluate" / "evaluate.json", {"unavailable": UNAVAILABLE, "protocol": {"data_identity": "e2e"}})
    register(params)
    promote(params)
    encoder(params, register=True, progress=False)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # setup_mlflow exports these
        os.environ.pop(key, None)
    return params


@dataclasses.dataclass(frozen=True)
class WebServer:
    url: str                                   # http://127.0.0.1:<port>/
    process: subprocess.Popen                  # the gunicorn master (its own process group)
    log: Path                                  # its stderr (gunicorn's error log)


@contextlib.contextmanager
def web_server(sets: Mapping[str, object], secret: str, log: Path, workers: int | None = None,
               ready: str | None = "healthz", timeout_s: float = 120) -> Iterator[WebServer]:
    """``radsynth web --profile tiny`` with ``--set`` overrides on a free 127.0.0.1 port.

    Returns once gunicorn prints its banner and (``ready``) that path answers 2xx; the whole
    process group is stopped on exit (SIGTERM, then SIGKILL after 30 s; already gone is fine).
    """
    from pipelines.demo import signal_group

    port = free_port()
    cmd = [sys.executable, "-m", "radsynth.cli", "web", "--profile", "tiny", "--host", "127.0.0.1", "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RADSYNTH_WEB_SECRET": secret}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        banner = proc.stdout.readline()        # "radsynth web: serving on <url> ..." once gunicorn listens
        assert f"serving on {url}" in banner, banner + log.read_text(errors="replace")[-4000:]
        server = WebServer(url, proc, log)
        if ready is not None:
            wait(server, ready, timeout_s)
        yield server
    finally:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()



def wait(server: WebServer, path: str, timeout_s: float) -> None:
    """Until ``server.url + path`` answers 2xx; an AssertionError with gunicorn's log if it dies or overruns."""
    from pipelines.demo import wait_http
    from radsynth.errors import RadsynthError

    try:
        wait_http(server.url + path, server.process, timeout_s, "radsynth web", server.log)
    except RadsynthError as exc:
        raise AssertionError(f"{exc}\n{server.log.read_text(errors='replace')[-4000:]}") from None


@dataclasses.dataclass(frozen=True)
class Stack:
    params: "Params"
    url: str
    triton: "TritonServer"
    web: WebServer


@contextlib.contextmanager
def serving_stack(tmp: Path, secret: str, workers: int | None = None,
                  sets: Mapping[str, object] | None = None) -> Iterator[Stack]:
    """:func:`pipeline` in ``tmp``, tritonserver on its registry, and ``radsynth web`` on both
    (``sets``: more ``--set`` overrides for the web app)."""
    from serving.repository import build_repository
    from serving.server import TritonServer

    params = pipeline(tmp)
    sets = {"paths.mlflow_uri": params.paths.mlflow_uri, "web.triton_url": params.web.triton_url,
            "web.audit_log": params.web.audit_log, **(sets or {})}
    triton = TritonServer(params.serve, build_repository(params))
    with contextlib.ExitStack() as stop:
        triton.start()
        stop.callback(triton.stop)
        web = stop.enter_context(web_server(sets, secret, tmp / "web.log", workers=workers, ready=None))
        triton.wait_ready(120)
        wait(web, "healthz", 60)
        yield Stack(params, web.url, triton, web)
