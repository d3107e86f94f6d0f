"""The metrics entry point on small seeded image sets (no generator needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import classifier as clf
from model import metrics as M
from radsynth import metric_keys as mk
from radsynth.config import load_params
from tests.components.evaldata import CLASSES, make_dataset, synth_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    params = load_params(profile="tiny", overrides={"eval.inception_weights": str(root / "absent.pth")})
    real = M.real_splits(make_dataset(root / "dataset"), 16)
    model = clf.train_classifier(real.train, real.train_labels, len(CLASSES), steps=150, width=16, seed=0)
    path = clf.save_classifier(root / "clf.safetensors", model, {"classes": list(CLASSES)})
    labels = np.repeat(np.arange(len(CLASSES)), params.eval.samples_per_class)
    fresh = synth_images(labels, 16, seed=77)  # same distribution, new images
    result = M.compute_metrics(fresh, labels, real, path, params.eval, cache_dir=root / "cache")
    return params, real, path, labels, fresh, result, root


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 1, 32, 32)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    ours = M.ssim(x, y, win=11)
    ref = [structural_similarity(a[0] / 127.5 - 1, b[0] / 127.5 - 1, data_range=2.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False) for a, b in zip(x, y)]
    # scikit-image averages over the image minus a border; ours over the valid region: same pixels.
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    assert np.allclose(M.ssim(x, x), 1.0) and np.allclose(M.ms_ssim(x, x), 1.0)
    assert M.ms_ssim(x, y).max() < 0.99


@pytest.mark.parametrize("res, plan", [(8, (3, 2)), (16, (7, 2)), (32, (7, 3)), (64, (11, 3)), (128, (11, 4)), (256, (11, 5))])
def test_ms_ssim_plan_keeps_the_coarsest_scale_a_window_wide(res, plan):
    win, scales = M.ms_ssim_plan(res)
    assert (win, scales) == plan
    assert res // 2 ** (scales - 1) >= win


def test_domain_fid_separates_real_from_noise_and_other_conditions(setup):
    _, real, path, *_ = setup
    feats = {s: clf.extract_features(clf.load_classifier(path)[0], getattr(real, s)) for s in ("val", "test")}
    val, test = feats["val"][real.val_labels == 0], feats["test"][real.test_labels == 0]
    other = feats["val"][real.val_labels == 1]
    noise = clf.extract_features(clf.load_classifier(path)[0],
                                 np.random.default_rng(1).integers(0, 256, (20, 1, 16, 16)).astype(np.uint8))
    same = M.fid_from_features(val, test)
    assert same * 5 < M.fid_from_features(other, test)
    assert same * 50 < M.fid_from_features(noise, test)


def test_metrics_are_flat_per_condition_and_overall(setup):
    _, real, _, _, _, result, _ = setup
    v = result.values
    for key in (mk.FID_DOMAIN, mk.KID_DOMAIN, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST, mk.MS_SSIM_NEAREST,
                mk.MS_SSIM_DIVERSITY, mk.COND_ACC, mk.COND_CONF, mk.REAL_ACC, mk.TSTR_ACC):
        assert key in v
        for c in CLASSES:
            assert mk.per_class(key, c) in v, mk.per_class(key, c)
    for key in (mk.FID_DOMAIN, mk.KID_DOMAIN, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST, mk.MS_SSIM_DIVERSITY):
        assert key + mk.REF_SUFFIX in v
    assert all(isinstance(x, float) for x in v.values())
    # Images from the real distribution: recognised, covered, not memorised.
    assert v[mk.COND_ACC] > 0.8 and v[mk.REAL_ACC] > 0.8
    assert v[mk.RECALL] > 0.5 and v[mk.PRECISION] > 0.5
    assert v[mk.TSTR_ACC] > 0.6 and v[mk.TRTR_ACC] > 0.6
    assert v[mk.MEMORISATION_SHARE] < 0.1 and v[mk.MEMORISATION_SHARE_FEATURE] < 0.1
    assert v[mk.FID_DOMAIN] < 5 * max(v[mk.FID_DOMAIN + mk.REF_SUFFIX], 0.1)
    proto = result.protocol
    assert proto["samples"]["generated"] == {c: 24 for c in CLASSES}
    assert proto["domain_extractor"]["weights_sha256"] and proto["seed"] == 2026
    assert proto["ms_ssim"]["scales"] == 2 and proto["ms_ssim"]["window"] == 7


def test_inception_absent_is_reported_unavailable_and_never_substituted(setup):
    params, *_, result, root = setup
    for key in (mk.FID_INCEPTION, mk.KID_INCEPTION):
        assert key not in result.values and key + mk.REF_SUFFIX not in result.values
        assert not any(k.startswith(key) for k in result.values)
        assert "absent.pth" in result.unavailable[key]
    assert result.protocol["inception_extractor"]["available"] is False
    bogus = root / "bogus.pth"
    torch.save({"not": torch.zeros(1)}, bogus)
    path, reason = M.inception_weights_path(params.eval.__class__(inception_weights=str(bogus)))
    assert path is None and "not the InceptionV3 state dict" in reason


def test_training_images_returned_verbatim_are_memorisation(setup):
    params, real, path, *_ = setup
    pick = np.concatenate([np.flatnonzero(real.train_labels == i)[:24] for i in range(len(CLASSES))])
    result = M.compute_metrics(real.train[pick], real.train_labels[pick], real, path, params.eval)
    assert result.values[mk.MEMORISATION_SHARE] == 1.0
    assert result.values[mk.MEMORISATION_SHARE_FEATURE] == 1.0
    assert result.values[mk.NN_TRAIN_DIST_PIXEL] == 0.0 < result.values[mk.NN_TRAIN_DIST_PIXEL + mk.REF_SUFFIX]


def test_real_features_are_cached_per_data_version(setup):
    params, real, path, labels, fresh, first, root = setup
    again = M.compute_metrics(fresh, labels, real, path, params.eval, cache_dir=root / "cache")
    assert again.protocol["domain_extractor"]["features_cached"] is True
    assert again.values == first.values
    assert len(list((root / "cache").glob("features-radsynth-domain-*.npz"))) == 1


def test_bad_generated_array_is_a_clear_error(setup):
    params, real, path, labels, fresh, *_ = setup
    from radsynth.errors import RadsynthError

    with pytest.raises(RadsynthError, match="uint8"):
        M.compute_metrics(fresh.astype(np.float32), labels, real, path, params.eval)
