"""The image -> z encoder: it learns to invert the frozen generator, exports to ONNX with parity,
and the ``encoder`` step writes its artefacts and registers it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.encoder import Encoder, export_onnx, reconstruction_report, train_encoder
from radsynth.config import load_params
from radsynth.dataset import to_uint8
from radsynth.latent import z_from_seed

from .conftest import CLASSES, ROOT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny():
    from model.registry import build_networks

    params = load_params(ROOT / "params.yaml", profile="tiny")
    G, _ = build_networks(params.model, len(CLASSES), 1, 16, seed=0)
    G.eval().requires_grad_(False)
    return params, G


def generator_images(G, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images the generator can produce exactly (so a perfect encoder exists), with their classes."""
    c = np.arange(n, dtype=np.int64) % len(CLASSES)
    with torch.no_grad():
        x = G(torch.from_numpy(z_from_seed(seed, n, G.z_dim)), torch.from_numpy(c)).numpy()
    return to_uint8(x), c


def test_encoder_shapes_and_sizes():
    E = Encoder(z_dim=16, img_resolution=32, img_channels=1, channels=8)
    assert E(torch.zeros(3, 1, 32, 32)).shape == (3, 16)
    with pytest.raises(ValueError, match="power of two"):
        Encoder(16, 24, 1)


def test_training_inverts_the_frozen_generator(tiny):
    """On images G can make, trained E reconstructs far better than its own initial state and
    than random latents: the loss uses G, so a broken (e.g. detached) path would not improve."""
    params, G = tiny
    x, c = generator_images(G, 192, seed=1)
    x_val, c_val = generator_images(G, 48, seed=2)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    torch.manual_seed(0)
    untrained = Encoder(G.z_dim, 16, 1, params.encoder.channels).eval()
    start = reconstruction_report(untrained, G, x_val, c_val)
    cfg = dataclasses.replace(params.encoder, steps=150, batch=32)
    E, losses = train_encoder(G, x, c, cfg, seed=0, progress=False)
    after = reconstruction_report(E, G, x_val, c_val)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert after.mse < 0.6 * start.mse
    assert after.ssim > after.ssim_random_z + 0.05
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())  # G stayed frozen
    E2, losses2 = train_encoder(G, x, c, cfg, seed=0, progress=False)
    assert losses2 == losses  # same seed, same run


def test_onnx_export_parity_and_metadata(tmp_path):
    torch.manual_seed(0)
    E = Encoder(16, 16, 1, channels=8).eval()
    path = export_onnx(E, tmp_path / "encoder.onnx", {"z_dim": "16", "img_resolution": "16"}, opset=17)
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props} == {"z_dim": "16", "img_resolution": "16"}
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["z"]
    x = np.random.default_rng(3).uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32)  # batch 5: dynamic axis
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["z"], {"image": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, E(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_encoder_step_writes_artefacts_and_registers(tiny, tmp_path, monkeypatch):
    from components.encoder import encoder
    from model.checkpoint import save_generator
    from mlflow.tracking import MlflowClient
    from radsynth.dataset import save_dataset

    _, G = tiny
    art = tmp_path / "artifacts"
    save_generator(art / "train" / "G_ema.safetensors", G, {"classes": list(CLASSES), "data_md5": "test", "params_digest": "test"})
    x, c = generator_images(G, 90, seed=4)
    splits = ["train"] * 60 + ["val"] * 20 + ["test"] * 10
    levels = {16: x, 8: x.reshape(90, 1, 8, 2, 8, 2).mean(axis=(3, 5)).astype(np.uint8)}
    save_dataset(art / "dataset", levels, [f"p{i}" for i in range(90)], c, splits, CLASSES)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={
        "paths.artifacts": str(art), "paths.mlflow_uri": uri, "paths.mlflow_artifacts": str(tmp_path / "mlartifacts"),
        "encoder.steps": 20,
    })
    summary = encoder(params, register=True, progress=False)
    written = json.loads((art / "encoder" / "encoder.json").read_text())
    assert written == summary
    assert (art / "encoder" / "params.yaml").is_file()
    assert summary["z_dim"] == G.z_dim and summary["img_resolution"] == 16 and summary["classes"] == list(CLASSES)
    assert summary["recon_images"] == 20  # the validation split
    props = {p.key: p.value for p in onnx.load(str(art / "encoder" / "encoder.onnx")).metadata_props}
    assert props["z_dim"] == str(G.z_dim) and json.loads(props["classes"]) == list(CLASSES)
    reg = summary["registered"]
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("radsynth-encoder", "candidate")
    assert str(mv.version) == reg["version"]
    assert mv.tags["onnx_sha256"] == summary["sha256"]  # MLflow stored the file byte for byte
    assert mv.tags["z_dim"] == str(G.z_dim) and mv.tags["generator_sha256"] == summary["generator_sha256"]
