"""The judge's classifier: full-resolution input, seeded early-stopped training, light augmentation
without flips, safetensors round trip, ONNX, the torch-fidelity extractor."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from model import classifier as clf
from radsynth.config import JudgeConfig
from tests.components.evaldata import CLASSES, synth_images

torch.set_num_threads(1)
RECIPE = JudgeConfig(width=8, depth=1, max_epochs=8, patience=3)


@pytest.fixture(scope="module")
def data():
    labels = np.repeat(np.arange(3), 50)
    val_labels = np.repeat(np.arange(3), 15)
    test_labels = np.repeat(np.arange(3), 20)
    return (synth_images(labels, 16, 0), labels, synth_images(val_labels, 16, 2), val_labels,
            synth_images(test_labels, 16, 1), test_labels)


def test_training_is_seeded_early_stopped_and_learns(data):
    x, y, xv, yv, xt, yt = data
    a, rec_a = clf.train_classifier(x, y, 3, RECIPE, seed=3, val=(xv, yv))
    b, rec_b = clf.train_classifier(x, y, 3, RECIPE, seed=3, val=(xv, yv))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert rec_a.epochs == rec_b.epochs and rec_a.best_epoch == rec_b.best_epoch
    assert clf.accuracy(a, xt, yt) > 0.8
    assert 1 <= rec_a.best_epoch <= rec_a.epochs <= RECIPE.max_epochs
    assert rec_a.val_balanced_acc > 0.8 and rec_a.steps == rec_a.epochs * clf.MIN_STEPS_PER_EPOCH
    # The kept weights are the best epoch's: the score recorded is the one the model has.
    assert clf.balanced_accuracy(clf.predict_proba(a, xv).argmax(1), yv, 3)[0] == pytest.approx(rec_a.val_balanced_acc)


def test_patience_stops_training_once_val_stops_improving(data):
    x, y, xv, yv, *_ = data
    long = dataclasses.replace(RECIPE, max_epochs=60, patience=2)
    _, rec = clf.train_classifier(x, y, 3, long, seed=0, val=(xv, yv))
    assert rec.stopped_early and rec.epochs < 60 and rec.epochs - rec.best_epoch == 2


def test_balanced_accuracy_weighs_every_condition_equally():
    labels = np.array([0] * 8 + [1] * 2)
    pred = np.array([0] * 8 + [0, 1])  # the majority class right, the minority half right
    bal, per = clf.balanced_accuracy(pred, labels, 3)
    assert per[:2] == [1.0, 0.5] and np.isnan(per[2]) and bal == 0.75
    assert (pred == labels).mean() == 0.9


def test_nothing_is_downscaled_before_the_network():
    """A period-2 checkerboard averages to zero under any 2x2 downscale; the judge's first layer must see it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = clf.DomainClassifier(clf.ClassifierSpec(3, 1, 64, width=8, depth=1)).eval()
    x = torch.zeros(1, 1, 64, 64)
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 0.6 - 0.3  # +-0.3
    assert torch.nn.functional.avg_pool2d(board[None, None], 2).abs().max() == 0
    with torch.no_grad():
        change = (model.features(x + board) - model.features(x)).abs().max()
        stem = (model.body[0](x + board) - model.body[0](x)).abs().mean()
    assert change > 1e-4 and stem > 1e-2


def test_augmentation_is_light_and_never_flips():
    gen = torch.Generator().manual_seed(0)
    x = -torch.ones(64, 1, 32, 32)
    x[:, :, :, :8] = 1.0  # bright on the left only
    out = clf.augment(x, gen, shift=0.05, scale=0.06, contrast=0.15)
    left, right = out[..., :8].mean(dim=(1, 2, 3)), out[..., -8:].mean(dim=(1, 2, 3))
    assert bool((left > right + 0.5).all())                       # never mirrored
    assert not torch.equal(out, x)                                # but changed
    assert torch.equal(clf.augment(x, gen, 0.0, 0.0, 0.0), x)     # off means off


def test_save_load_onnx_and_extractor_agree(data, tmp_path):
    import onnx
    import onnxruntime as ort
    from torch_fidelity.utils import create_feature_extractor

    x, y, xv, yv, xt, _ = data
    model, _ = clf.train_classifier(x, y, 3, dataclasses.replace(RECIPE, max_epochs=1), seed=0, val=(xv, yv))
    path = clf.save_classifier(tmp_path / "c.safetensors", model, {"classes": list(CLASSES)})
    loaded, meta = clf.load_classifier(path)
    assert meta["classes"] == list(CLASSES) and "spec" not in meta
    np.testing.assert_array_equal(clf.predict_proba(model, xt), clf.predict_proba(loaded, xt))

    onnx_path = clf.export_classifier_onnx(loaded, tmp_path / "c.onnx", CLASSES)
    proto = onnx.load(str(onnx_path))
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["classes"]) == list(CLASSES)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = xt[:5].astype(np.float32) / 127.5 - 1
    logits = sess.run(["logits"], {"image": batch})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, loaded(torch.from_numpy(batch)).numpy(), atol=1e-4)

    name = clf.register_domain_extractor()
    assert clf.register_domain_extractor() == name  # idempotent
    fe = create_feature_extractor(name, [clf.FEATURE_LAYER], cuda=False, feature_extractor_weights_path=str(path))
    feats = fe(torch.from_numpy(xt[:5]))[0]
    np.testing.assert_allclose(feats.numpy(), clf.extract_features(loaded, xt[:5]), atol=1e-6)


def test_a_file_that_is_not_a_classifier_is_refused(tmp_path):
    from safetensors.torch import save_file

    from radsynth.errors import RadsynthError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(RadsynthError, match="not a radsynth classifier"):
        clf.load_classifier(tmp_path / "x.safetensors")
    with pytest.raises(RadsynthError, match="not found"):
        clf.load_classifier(tmp_path / "missing.safetensors")
