"""The domain classifier: deterministic training, safetensors round trip, ONNX, torch-fidelity extractor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import classifier as clf
from tests.components.evaldata import CLASSES, synth_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    labels = np.repeat(np.arange(3), 50)
    test_labels = np.repeat(np.arange(3), 20)
    return synth_images(labels, 16, 0), labels, synth_images(test_labels, 16, 1), test_labels


def test_training_is_seeded_and_learns(data):
    x, y, xt, yt = data
    a = clf.train_classifier(x, y, 3, steps=100, width=8, seed=3)
    b = clf.train_classifier(x, y, 3, steps=100, width=8, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert clf.accuracy(a, xt, yt) > 0.8


def test_save_load_onnx_and_extractor_agree(data, tmp_path):
    import onnx
    import onnxruntime as ort
    from torch_fidelity.utils import create_feature_extractor

    x, y, xt, _ = data
    model = clf.train_classifier(x, y, 3, steps=10, width=8, seed=0)
    path = clf.save_classifier(tmp_path / "c.safetensors", model, {"classes": list(CLASSES)})
    loaded, meta = clf.load_classifier(path)
    assert meta["classes"] == list(CLASSES) and meta["spec"]["width"] == 8 if "spec" in meta else True
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
