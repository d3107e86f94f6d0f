"""Serving fixtures: a tiny exported generator, a registry holding it, ONE real tritonserver.

The server is started once per session on free ports, from a repository built through the
registry path (alias ``champion``, sha256 verified), and stopped at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from radsynth.config import Params, load_params
from tests.conftest import ROOT
from tests.serving.tiny import CLASSES, make_generator

MODEL = "radsynth-generator"
CLASSIFIER = "radsynth-classifier"


def serving_params(tmp: Path, **overrides) -> Params:
    """tiny-profile params with a private MLflow store, repository and free ports."""
    from serving.server import free_port

    base = {
        "paths.mlflow_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "paths.mlflow_artifacts": str(tmp / "mlruns" / "artifacts"),
        "paths.artifacts": str(tmp / "artifacts"),
        "serve.repository": str(tmp / "model_repository"),
        "serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port(),
        "serve.retries": 1, "serve.backoff_s": 0.05, "serve.timeout_s": 20.0,
    }
    base.update(overrides)
    return load_params(ROOT / "params.yaml", profile="tiny", overrides=base)


def register_onnx(params: Params, onnx_path: Path, name: str, alias: str, sha256: str | None = None,
                  signed: bool = True) -> int:
    """Log ``onnx_path`` as an MLflow ONNX model version (as `radsynth register` does), tag and alias it,
    and sign it as `radsynth promote` does (``signed=False``: leave it unsigned).

    ``sha256`` overrides the ``onnx_sha256`` tag (to simulate a corrupted artefact).
    """
    import tempfile

    import mlflow
    import onnx

    from radsynth.io import sha256_file
    from radsynth.tracking import setup_mlflow

    setup_mlflow(params)
    client = mlflow.MlflowClient()
    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name)
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if sha256 is None:  # of the stored model.onnx (logged with external tensor data: the harder case)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
            sha256 = sha256_file(local / "model.onnx")
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    for key, value in {**meta, "onnx_sha256": sha256, "gate": "passed"}.items():
        client.set_model_version_tag(name, str(version), key, value)
    if signed:
        from radsynth.signing import load_private_key, sign

        for key, value in sign(load_private_key(params.signing, create=True), name, version, sha256).items():
            client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, alias, str(version))
    return version


def _forget_mlflow_uri() -> None:
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which setup_mlflow then prefers:
    drop it so each test's params pick their own store."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def _own_mlflow_store():
    _forget_mlflow_uri()
    yield
    _forget_mlflow_uri()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``(G, onnx_path)``: a seeded tiny-profile generator (3 classes, 16x16 grey) and its ONNX."""
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml", profile="tiny")
    return make_generator(tmp_path_factory.mktemp("tiny") / "generator.onnx", params)


@pytest.fixture(scope="session")
def registry_params(tmp_path_factory, tiny) -> Params:
    """Params whose MLflow registry holds the tiny generator as v1 @champion."""
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    params = serving_params(tmp_path_factory.mktemp("serving"))
    _forget_mlflow_uri()
    register_onnx(params, tiny[1], MODEL, "champion")
    _forget_mlflow_uri()
    return params


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """``(model, onnx_path)``: an untrained domain classifier (16x16 grey, 3 classes) as ONNX."""
    from model.classifier import ClassifierSpec, DomainClassifier, export_classifier_onnx

    torch.manual_seed(0)
    model = DomainClassifier(ClassifierSpec(num_classes=len(CLASSES), img_channels=1, img_resolution=16, width=8)).eval()
    return model, export_classifier_onnx(model, tmp_path_factory.mktemp("classifier") / "classifier.onnx", CLASSES)


@pytest.fixture(scope="session")
def triton(registry_params, classifier):
    """A running tritonserver serving the generator (from the registry, @champion) and the
    classifier (local ONNX); yields the server."""
    import dataclasses

    from serving.repository import build_repository
    from serving.server import TritonServer

    _forget_mlflow_uri()
    params = dataclasses.replace(registry_params, serve=dataclasses.replace(
        registry_params.serve, models=(MODEL, CLASSIFIER), onnx={CLASSIFIER: str(classifier[1])}))
    repo = build_repository(params)
    _forget_mlflow_uri()
    server = TritonServer(registry_params.serve, repo)
    server.start()
    try:
        server.wait_ready(90)
        from serving.client import Client

        with Client(server.grpc_url) as c:  # before any test: what the load's warm-up ran
            server.ready_statistics = c.statistics()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def client(triton, registry_params):
    from serving.client import Client

    with Client.from_params(registry_params) as c:
        yield c


__all__ = ["CLASSES", "CLASSIFIER", "MODEL", "register_onnx", "serving_params"]
