"""`radsynth deploy` on a real tritonserver (explicit model control): a promoted champion is
served without a restart, after a health check on a staging copy; an unhealthy one never is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radsynth.config import load_params
from serving.client import Client
from serving.deploy import STAGING_SUFFIX, DeployError, deploy
from tests.conftest import ROOT
from tests.serving.conftest import MODEL, register_onnx, serving_params
from tests.serving.tiny import CLASSES, make_generator


def broken_generator(path, z_dim: int = 16, res: int = 16):
    """A generator ONNX with the right tensors and metadata whose every pixel is 5.0 (outside [-1, 1])."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["z"], ["z_shape"]),
        helper.make_node("Slice", ["z_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "chw"], ["out_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["out_shape"], ["flat"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [5.0])),
        helper.make_node("Cast", ["class"], ["class_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["class_f", "col"], ["class_col"]),
        helper.make_node("Mul", ["class_col", "zero_f"], ["nothing"]),
        helper.make_node("Add", ["flat", "nothing"], ["image"]),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("chw", TensorProto.INT64, [3], [1, res, res]), helper.make_tensor("col", TensorProto.INT64, [4], [-1, 1, 1, 1]),
             helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0])]
    graph = helper.make_graph(nodes, "broken", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", z_dim]),
                                                helper.make_tensor_value_info("class", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, res, res])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in {"classes": json.dumps(CLASSES), "z_dim": str(z_dim), "img_resolution": str(res), "img_channels": "1"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny):
    """A tritonserver started by the project's launcher (serve.model_control explicit) on @champion v1."""
    import os

    from serving.repository import build_repository
    from serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("deploy")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)
    params = serving_params(tmp)
    assert params.serve.model_control == "explicit"
    base = load_params(ROOT / "params.yaml", profile="tiny")
    onnx = {0: tiny[1], 1: make_generator(tmp / "g1" / "generator.onnx", base, seed=1)[1]}
    register_onnx(params, onnx[0], MODEL, "champion")
    server = TritonServer(params.serve, build_repository(params))
    server.start()
    try:
        server.wait_ready(90)
        yield params, server, onnx, tmp
    finally:
        server.stop()


def served(params) -> tuple[str, np.ndarray]:
    with Client.from_params(params) as client:
        return client.info.version, client.generate(CLASSES[0], 2, seed=7)


def test_deploy_swaps_the_champion_without_a_restart_and_refuses_an_unhealthy_one(live):
    import threading

    params, server, onnx, tmp = live
    repo = server.repository
    pid = server.process.pid
    version, v1_images = served(params)
    assert version == "1"
    assert deploy(params)["unchanged"] == [MODEL]                               # nothing to do yet

    register_onnx(params, onnx[1], MODEL, "champion")                          # v2 promoted in the registry
    answered, failed, stop = [], [], threading.Event()

    def traffic():                                                              # a client calling all through the swap
        with Client.from_params(params) as client:
            while not stop.is_set():
                try:
                    answered.append(client.refresh().version if len(answered) % 5 == 0 else client.generate(CLASSES[1], 1, 3).shape)
                except Exception as exc:  # noqa: BLE001 - any failure is what this test counts
                    failed.append(repr(exc))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        out = deploy(params)
    finally:
        stop.set()
        thread.join(30)
    assert not failed and len(answered) > 5, failed[:3]                       # no request failed during the swap
    assert out["changed"] == {MODEL: {"from": [1], "to": [2]}}
    version, v2_images = served(params)
    assert version == "2" and not np.array_equal(v1_images, v2_images)         # the new weights answer
    assert server.process.pid == pid and server.process.poll() is None         # the same process, never restarted
    assert sorted(p.name for p in (repo / MODEL).iterdir() if p.is_dir()) == ["2"]
    assert json.loads((repo / "repository.json").read_text())["models"][MODEL] == [2]
    from serving.deploy import _grpc
    from serving.server import admin_key

    names = {m["name"] for m in _grpc(server.grpc_url, admin_key(params.serve)).get_model_repository_index(as_json=True)["models"]}
    assert names == {MODEL}                                                     # the staging copy is gone

    # the control: a promoted version that answers out of range is never served
    register_onnx(params, broken_generator(tmp / "broken.onnx"), MODEL, "champion")   # v3
    with pytest.raises(DeployError, match=r"v3 failed its health check.*still serving v2.*range"):
        deploy(params)
    version, images = served(params)
    assert version == "2" and np.array_equal(images, v2_images)
    assert not (repo / MODEL / "3").exists() and not (repo / f"{MODEL}{STAGING_SUFFIX}").exists()

    # a rollback in the registry is deployed the same way (an older version number)
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(MODEL, "champion", "1")
    assert deploy(params)["changed"] == {MODEL: {"from": [2], "to": [1]}}
    version, images = served(params)
    assert version == "1" and np.array_equal(images, v1_images)
    assert server.process.pid == pid


def test_deploy_explains_what_it_cannot_do(live, tmp_path):
    import dataclasses

    params, server, _, _ = live
    none = dataclasses.replace(params, serve=dataclasses.replace(params.serve, model_control="none"))
    with pytest.raises(DeployError, match="restart"):
        deploy(none)
    with pytest.raises(DeployError, match="no repository.json"):
        deploy(params, repository=tmp_path)
    from serving.server import free_port

    with pytest.raises(DeployError, match="cannot be reached"):
        deploy(params, url=f"127.0.0.1:{free_port()}")


def test_model_control_flags():
    import dataclasses

    from serving.server import ServerError, model_control_flags

    cfg = load_params(ROOT / "params.yaml", profile="tiny").serve
    assert model_control_flags(cfg) == ["--model-control-mode=explicit", "--load-model=*"]
    assert model_control_flags(dataclasses.replace(cfg, model_control="poll", repository_poll_s=3)) == [
        "--model-control-mode=poll", "--repository-poll-secs=3"]
    assert model_control_flags(dataclasses.replace(cfg, model_control="none")) == []
    with pytest.raises(ServerError, match="explicit, poll, none"):
        model_control_flags(dataclasses.replace(cfg, model_control="sometimes"))


def test_poll_mode_picks_up_the_swap_and_checks_it_after(live, tmp_path):
    """serve.model_control poll: deploy writes the new version, Triton's scan loads it, deploy checks it."""
    from serving.repository import build_repository
    from serving.server import TritonServer

    _, _, onnx, _ = live
    params = serving_params(tmp_path, **{"serve.model_control": "poll", "serve.repository_poll_s": 1})
    register_onnx(params, onnx[0], MODEL, "champion")
    with TritonServer(params.serve, build_repository(params)) as server:
        assert "--model-control-mode=poll" in " ".join(server.process.args)
        register_onnx(params, onnx[1], MODEL, "champion")
        assert deploy(params)["changed"] == {MODEL: {"from": [1], "to": [2]}}
        assert served(params)[0] == "2"
        assert sorted(p.name for p in (server.repository / MODEL).iterdir() if p.is_dir()) == ["2"]


def test_deploy_refuses_an_unsigned_champion_and_a_wrong_or_missing_admin_key(live, tmp_path, monkeypatch):
    """Deploy builds through the verifying repository builder and loads with the admin key only."""
    import dataclasses

    from mlflow import MlflowClient

    from serving.repository import RepositoryError
    from serving.server import ADMIN_KEY_ENV

    params, server, onnx, _ = live
    before, images = served(params)
    registry = MlflowClient()
    previous = registry.get_model_version_by_alias(MODEL, "champion").version
    register_onnx(params, onnx[1], MODEL, "champion", signed=False)          # promoted by someone without the key
    try:
        with pytest.raises(RepositoryError, match="carries no promotion signature"):
            deploy(params)
        assert served(params)[0] == before and np.array_equal(served(params)[1], images)   # the old version still serves
    finally:
        registry.set_registered_model_alias(MODEL, "champion", previous)
    monkeypatch.setenv(ADMIN_KEY_ENV, "not-this-servers-key")
    with pytest.raises(DeployError, match="refused the model-repository API"):
        deploy(params)
    monkeypatch.delenv(ADMIN_KEY_ENV)
    elsewhere = dataclasses.replace(params, serve=dataclasses.replace(params.serve, repository=str(tmp_path / "repo")))
    with pytest.raises(DeployError, match="no Triton admin key"):
        deploy(elsewhere, repository=server.repository)
    assert served(params)[0] == before
