"""ONNX export of the real generator: checker, tensor contract, metadata, parity with PyTorch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from components import export as ex
from radsynth.cli import main
from radsynth.io import sha256_file
from radsynth.latent import z_from_seed
from tests.components.evaldata import CLASSES, eval_params, save_tiny_generator

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    params = eval_params(root)
    gen = save_tiny_generator(root / "G_ema.safetensors", seed=5)
    record = ex.export(params, gen, root / "export")
    return root, params, gen, record


def test_graph_contract_checker_and_metadata(exported):
    import onnx

    root, params, _, record = exported
    path = root / "export" / "generator.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert record["sha256"] == sha256_file(path) == json.loads((root / "export" / "export.json").read_text())["sha256"]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [params.export.opset]
    assert record["inputs"] == {"z": {"dtype": "float32", "shape": ["N", 16]}, "class": {"dtype": "int64", "shape": ["N"]}}
    assert record["outputs"] == {"image": {"dtype": "float32", "shape": ["N", 1, 16, 16]}}
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == list(CLASSES)
    assert (props["z_dim"], props["img_resolution"], props["img_channels"], props["variant"]) == ("16", "16", "1", "pgcgan-sa")


def test_onnx_runtime_matches_pytorch_for_the_same_seed(exported):
    import onnxruntime as ort

    from model.checkpoint import load_generator

    root, _, gen, record = exported
    assert record["parity"]["max_abs_diff"] <= 1e-4
    G, _ = load_generator(gen)
    sess = ort.InferenceSession(str(root / "export" / "generator.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # dynamic batch
        z = z_from_seed(42, n, 16)
        c = np.arange(n, dtype=np.int64) % 3
        out = sess.run(["image"], {"z": z, "class": c})[0]
        with torch.no_grad():
            ref = G(torch.from_numpy(z), torch.from_numpy(c)).numpy()
        assert out.shape == (n, 1, 16, 16) and out.dtype == np.float32
        assert np.abs(out - ref).max() <= 1e-4
        assert out.min() >= -1 and out.max() <= 1
    # Different conditions give different images for the same z.
    z = np.repeat(z_from_seed(1, 1, 16), 3, axis=0)
    out = sess.run(["image"], {"z": z, "class": np.arange(3, dtype=np.int64)})[0]
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_parity_failure_keeps_nothing(exported, tmp_path):
    from model.checkpoint import load_generator

    root, params, gen, _ = exported
    G, meta = load_generator(gen)
    strict = dataclasses.replace(params.export, parity_atol=-1.0)  # no export can meet this
    with pytest.raises(ex.ExportError, match="differs from PyTorch"):
        ex.export_generator(G, meta, tmp_path / "g.onnx", strict)
    assert not (tmp_path / "g.onnx").exists() and not list(tmp_path.glob(".g.onnx*"))


def test_cli_export_and_missing_generator(exported, tmp_path, capsys):
    root, *_ = exported
    gen = root / "G_ema.safetensors"
    assert main(["export", "--profile", "tiny", "--generator", str(gen), "--out", str(tmp_path / "e")]) == 0
    assert "parity max|diff|" in capsys.readouterr().out
    assert main(["export", "--profile", "tiny", "--generator", str(tmp_path / "none.safetensors")]) == 2
    assert "no trained generator" in capsys.readouterr().err


def test_a_class_modulated_generator_exports_and_matches_pytorch(tmp_path):
    """The cpu recipe's generator (model.class_modulation): its per-class tables survive the
    checkpoint and the ONNX graph (a Gather per layer), with the same parity bound."""
    import onnxruntime as ort

    from model.checkpoint import load_generator, save_generator
    from model.registry import build_networks

    params = eval_params(tmp_path, **{"model.class_modulation": True})
    G, _ = build_networks(params.model, 3, 1, 16, seed=3)
    mods = [m for m in G.modules() if type(m).__name__ == "ClassModulation"]
    assert mods
    with torch.no_grad():                                # trained-looking tables (they start at zero)
        gen = torch.Generator().manual_seed(0)
        for m in mods:
            m.gain.copy_(0.3 * torch.randn(m.gain.shape, generator=gen))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    path = save_generator(tmp_path / "G_ema.safetensors", G.eval(),
                          {"classes": list(CLASSES), "data_md5": "test-md5", "params_digest": "test-digest"})
    loaded, _ = load_generator(path)
    want, got = G.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    record = ex.export(params, path, tmp_path / "export")
    assert record["parity"]["max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "export" / "generator.onnx"), providers=["CPUExecutionProvider"])
    z, c = z_from_seed(7, 6, 16), np.array([0, 1, 2, 2, 1, 0], dtype=np.int64)
    with torch.no_grad():
        ref = loaded(torch.from_numpy(z), torch.from_numpy(c)).numpy()
    assert np.abs(sess.run(["image"], {"z": z, "class": c})[0] - ref).max() <= 1e-4
