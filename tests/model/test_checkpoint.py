import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_generator, load_state, save_generator, save_state
from model.registry import VARIANTS, build_networks
from tests.model.conftest import tiny_model_config

META = {"classes": ["A", "B", "C"], "data_md5": "abc.dir", "params_digest": "f00"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generator_roundtrip_same_outputs(tmp_path, variant):
    G, _ = build_networks(tiny_model_config(variant), 3, 1, 16, seed=0)
    G.eval()
    path = save_generator(tmp_path / "G_ema.safetensors", G, META)
    G2, meta = load_generator(path)
    assert meta["variant"] == variant and meta["z_dim"] == 16 and meta["img_resolution"] == 16
    assert meta["img_channels"] == 1 and meta["classes"] == ["A", "B", "C"] and meta["data_md5"] == "abc.dir"
    z, c = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(G(z, c), G2(z, c))
    assert not G2.training and G2.resolution == 16 and G2.alpha == 1.0
    blob = (tmp_path / "G_ema.safetensors").read_bytes()
    assert b"__reduce__" not in blob and not blob.startswith(b"\x80")   # not a pickle


def test_generator_meta_must_name_classes(tmp_path):
    G, _ = build_networks(tiny_model_config(), 3, 1, 16, seed=0)
    with pytest.raises(CheckpointError, match="classes"):
        save_generator(tmp_path / "G.safetensors", G, {**META, "classes": ["A"]})


def test_mismatched_or_corrupt_pair_is_detected(tmp_path):
    G, _ = build_networks(tiny_model_config(), 3, 1, 16, seed=0)
    path = save_generator(tmp_path / "G.safetensors", G, META)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_generator(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_generator(tmp_path / "nope.safetensors")


def test_state_roundtrip_nested_and_keeps_only_latest_file(tmp_path):
    state = {"G": {"w": torch.arange(6.0).reshape(2, 3)}, "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
             "rng": torch.get_rng_state()}
    save_state(tmp_path / "state.json", state, {"step": 1})
    save_state(tmp_path / "state.json", state, {"step": 2})
    loaded, info = load_state(tmp_path / "state.json")
    assert info == {"step": 2}
    assert torch.equal(loaded["G"]["w"], state["G"]["w"]) and torch.equal(loaded["rng"], state["rng"])
    assert loaded["opt"]["state"][0]["step"].item() == 3.0 and loaded["opt"]["param_groups"][0]["lr"] == 1e-4
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1
    assert json.loads((tmp_path / "state.json").read_text())["format"] == "radsynth-train-state/1"


KILL_BETWEEN_RENAMES = r"""
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
from model.checkpoint import save_generator
from model.registry import build_networks
from tests.model.conftest import tiny_model_config
G, _ = build_networks(tiny_model_config(), 3, 1, 16, seed=1)       # the new generator
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("G_ema.safetensors"):                        # new weights in place, old sidecar still there
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
save_generator({path!r}, G, {meta!r})
"""


def test_a_kill_between_the_two_renames_keeps_the_previous_generator(root, tmp_path):
    import subprocess
    import sys

    old, _ = build_networks(tiny_model_config(), 3, 1, 16, seed=0)
    old.eval()
    path = save_generator(tmp_path / "G_ema.safetensors", old, META)
    script = KILL_BETWEEN_RENAMES.format(root=str(root), path=str(path), meta=META)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr                           # really killed mid-swap
    sidecar = json.loads((tmp_path / "G_ema.json").read_text())
    from radsynth.io import sha256_file

    assert sidecar["sha256"] != sha256_file(path)                      # the pair on disk is mixed ...
    G, meta = load_generator(path)                                      # ... and the reader gets the previous generator
    z, c = torch.randn(3, 16), torch.tensor([0, 1, 2])
    assert torch.equal(G(z, c), old(z, c)) and meta["classes"] == META["classes"]
    new, _ = build_networks(tiny_model_config(), 3, 1, 16, seed=2)
    new.eval()
    save_generator(path, new, META)                                     # the next save repairs, then swaps in the new pair
    G2, _ = load_generator(path)
    assert torch.equal(G2(z, c), new(z, c))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G_ema.json", "G_ema.safetensors"]


def test_checkpoint_without_the_new_model_keys_loads_with_the_old_behaviour(tmp_path):
    from model.checkpoint import LEGACY_MODEL_VALUES

    cfg = tiny_model_config(fade_after_output=False, separate_label_norm=False, d_embed_equalized=False)
    G, _ = build_networks(cfg, 3, 1, 16, seed=0)
    G.eval()
    path = save_generator(tmp_path / "G.safetensors", G, META)
    sidecar = json.loads((tmp_path / "G.json").read_text())
    for key in LEGACY_MODEL_VALUES:                                     # as a checkpoint from before these keys
        sidecar["model"].pop(key)
    (tmp_path / "G.json").write_text(json.dumps(sidecar))
    G2, meta = load_generator(path)
    assert (G2.fade_after_output, G2.separate_label_norm) == (False, False)
    z, c = torch.randn(2, 16), torch.tensor([0, 2])
    assert torch.equal(G(z, c), G2(z, c))
