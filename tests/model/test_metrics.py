"""The metrics: each family on tiny arrays, then the entry point on small seeded image sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import metrics as M
from model.judge import judge_for
from model.metrics import families as fam
from radsynth import metric_keys as mk
from radsynth.config import load_params
from tests.components.evaldata import CLASSES, make_dataset, synth_images

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------
# Families on tiny arrays
# --------------------------------------------------------------------------------------


def test_groups_are_overall_then_each_condition():
    gs = fam.groups(["A", "B"])
    labels = np.array([0, 1, 1])
    assert [g.key("fid") for g in gs] == ["fid", "fid/A", "fid/B"]
    assert [g.mask(labels).tolist() for g in gs] == [[True, True, True], [True, False, False], [False, True, True]]


def test_precision_is_fidelity_and_recall_is_coverage():
    """Mode collapse: every generated sample sits on one real sample. Precision (inside the real
    manifold) must be high and recall (real samples covered) near zero; swapped, this fails."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    collapsed = real[:1] + rng.normal(scale=1e-3, size=(200, 8))
    p, r = fam.precision_recall(collapsed, real, k=3)
    assert p > 0.95 and r < 0.05
    # The mirror case: samples spread far beyond the real data cover it but are mostly outside it.
    spread = rng.normal(scale=4.0, size=(200, 8))
    p, r = fam.precision_recall(spread, real, k=3)
    assert p < 0.3 and r > 0.8


def test_reference_draws_match_the_generated_count_per_condition():
    gen_labels = np.array([0] * 5 + [1] * 3)
    train_labels = np.array([0] * 10 + [1] * 2 + [2] * 4)
    draws = fam.reference_draws(gen_labels, train_labels, 3, draws=4, seed=1)
    assert len(draws) == 4
    for d in draws:
        counts = np.bincount(train_labels[d], minlength=3)
        assert counts.tolist() == [5, 2, 0]        # condition 1 has only 2 training images: all of them
        assert len(set(d.tolist())) == len(d)     # without replacement
    assert not all(np.array_equal(draws[0], d) for d in draws[1:])


def test_distances_read_in_reference_units():
    rng = np.random.default_rng(0)
    train_f, test_f = rng.normal(size=(600, 4)), rng.normal(size=(300, 4))
    train_l, test_l = np.repeat([0, 1], 300), np.repeat([0, 1], 150)
    shifted = rng.normal(loc=2.0, size=(100, 4))
    real_like = rng.normal(size=(100, 4))
    gen_l = np.repeat([0, 1], 50)
    draws = fam.reference_draws(gen_l, train_l, 2, 5, 0)
    kw = dict(classes=["A", "B"], draws=draws, fid_key="fid", kid_key="kid", units_key="units", kid_subsets=5, kid_subset_size=50, seed=0)
    good = fam.distances(real_like, gen_l, train_f, train_l, test_f, test_l, **kw)
    bad = fam.distances(shifted, gen_l, train_f, train_l, test_f, test_l, **kw)
    for c in ("A", "B"):
        assert good[f"units/{c}"] < 3 and bad[f"units/{c}"] > 30
        assert good[f"fid/{c}_ref"] == bad[f"fid/{c}_ref"] > 0 and good[f"fid/{c}_ref_sd"] > 0
        assert bad[f"units/{c}"] == pytest.approx(bad[f"fid/{c}"] / bad[f"fid/{c}_ref"])


def test_condition_accuracy_and_confusion_on_known_predictions():
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 0.8 + 0.2 / 3
    labels = np.array([0, 1, 1, 2, 2, 0])
    v = fam.condition_accuracy(probs, labels, probs, labels, ["A", "B", "C"])
    assert v["cond_acc/A"] == 0.5 and v["cond_acc/B"] == 0.5 and v["cond_acc/C"] == 1.0
    assert v["cond_acc"] == pytest.approx(4 / 6)
    assert v[mk.REAL_BALANCED_ACC] == pytest.approx(2 / 3)
    assert fam.confusion(probs.argmax(1), labels, 3).tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]


def test_memorisation_counts_copies_and_shifted_copies_not_neighbours():
    from model.calibration import shift

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    blobs = lambda n: np.stack([np.clip(128 + 100 * np.sin(xx / rng.uniform(2, 6) + rng.uniform(0, 6))  # noqa: E731
                                        * np.cos(yy / rng.uniform(2, 6)), 0, 255)[None] for _ in range(n)]).astype(np.uint8)
    train, test = blobs(40), blobs(40)
    copies = np.concatenate([train[:4], shift(train[4:8], np.full(4, 2), np.zeros(4, int))])  # 4 verbatim, 4 shifted by 2 px
    gen = np.concatenate([copies, blobs(12)])
    labels = np.array([0] * 10 + [1] * 10)
    feats = lambda a: a.reshape(len(a), -1)[:, ::16].astype(np.float64)  # noqa: E731 - any fixed embedding
    mem = fam.memorisation(gen, feats(gen), train, feats(train), test, feats(test), labels, ["A", "B"], percentile=1.0, max_shift=2)
    assert mem.values[mk.MEMORISATION_SHARE] == 8 / 20                    # both kinds of copy, nothing else
    assert mem.values["memorisation_share/A"] == 0.8 and mem.values["memorisation_share/B"] == 0.0
    assert mem.nearest_train[:8].tolist() == list(range(8)) and (mem.distance[:8] == 0).all()
    unshifted = fam.memorisation(gen, feats(gen), train, feats(train), test, feats(test), labels, ["A", "B"], 1.0, max_shift=0)
    assert unshifted.values[mk.MEMORISATION_SHARE] == 4 / 20              # without the tolerance the shifted copies escape


# --------------------------------------------------------------------------------------
# The entry point on seeded image sets
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    params = load_params(profile="tiny", overrides={"eval.inception_weights": str(root / "absent.pth")})
    real = M.real_splits(make_dataset(root / "dataset"), 16)
    judge = judge_for(real, params.eval, root / "cache")
    labels = np.repeat(np.arange(len(CLASSES)), params.eval.samples_per_class)
    fresh = synth_images(labels, 16, seed=77)  # same distribution, new images
    result = M.compute_metrics(fresh, labels, real, judge.path, params.eval, cache_dir=root / "cache")
    return params, real, judge, labels, fresh, result, root


def test_the_judge_is_cached_per_data_and_config(setup):
    params, real, judge, *_, root = setup
    assert not judge.cached and judge.train_seconds > 0
    test = judge.report["test"]
    assert test["balanced"] > 0.8 and set(test["per_class"]) == set(CLASSES)
    assert judge.report["training"]["best_epoch"] <= judge.report["training"]["epochs"]
    again = judge_for(real, params.eval, root / "cache")
    assert again.cached and again.path == judge.path and again.meta["report"] == judge.meta["report"]
    other = judge_for(real, params.eval.__class__(judge=params.eval.judge.__class__(width=4, depth=1, max_epochs=1)), root / "cache")
    assert other.path != judge.path and not other.cached


def test_metrics_are_flat_per_condition_and_overall(setup):
    _, real, _, _, _, result, _ = setup
    v = result.values
    for key in (mk.FID_DOMAIN, mk.FID_DOMAIN_UNITS, mk.KID_DOMAIN, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST, mk.MS_SSIM_NEAREST,
                mk.MS_SSIM_DIVERSITY, mk.COND_ACC, mk.COND_CONF, mk.REAL_ACC, mk.MEMORISATION_SHARE):
        assert key in v
        for c in CLASSES:
            assert mk.per_class(key, c) in v, mk.per_class(key, c)
    for key in (mk.FID_DOMAIN, mk.KID_DOMAIN, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST, mk.MS_SSIM_DIVERSITY):
        assert key + mk.REF_SUFFIX in v
    assert all(isinstance(x, float) for x in v.values())
    # Images from the real distribution: recognised, covered, not memorised, about one reference unit away.
    assert v[mk.COND_ACC] > 0.8 and v[mk.REAL_BALANCED_ACC] > 0.8
    assert v[mk.RECALL] > 0.5 and v[mk.PRECISION] > 0.5
    assert v[mk.MEMORISATION_SHARE] < 0.1 and v[mk.MEMORISATION_SHARE_FEATURE] < 0.1
    for c in CLASSES:
        assert v[mk.per_class(mk.FID_DOMAIN_UNITS, c)] < 4
    proto = result.protocol
    assert proto["samples"]["generated"] == {c: 24 for c in CLASSES}
    assert proto["reference"]["images_per_draw"] == {c: 24 for c in CLASSES} and proto["reference"]["draws"] == 3
    assert proto["domain_extractor"]["weights_sha256"] and proto["seed"] == 2026
    assert proto["ms_ssim"]["scales"] == 2 and proto["ms_ssim"]["window"] == 7
    assert np.asarray(result.details["confusion"]).sum() == 3 * 24


def test_utility_is_mean_and_sd_over_seeds_and_sane(setup):
    _, _, _, _, _, result, _ = setup
    v, proto = result.values, result.protocol["utility"]
    assert proto["computed"] and len(proto["seeds"]) == 3
    for key in (mk.TSTR_BALANCED_ACC, mk.TRTR_BALANCED_ACC, mk.AUG_BALANCED_ACC, mk.AUG_REAL_BALANCED_ACC,
                mk.AUG_MINORITY_RECALL, mk.AUG_REAL_MINORITY_RECALL):
        assert 0 <= v[key] <= 1 and v[key + mk.SD_SUFFIX] >= 0, key
    assert v[mk.TSTR_BALANCED_ACC] > 0.6 and v[mk.TRTR_BALANCED_ACC] > 0.6
    assert v[mk.TRTR_GAP] == pytest.approx(v[mk.REAL_BALANCED_ACC] - v[mk.TRTR_BALANCED_ACC])
    assert proto["trtr"]["train_images"] == proto["tstr"]["train_images"]   # size-matched
    assert proto["augment"]["minority_condition"] in CLASSES


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
    params, real, judge, *_ = setup
    pick = np.concatenate([np.flatnonzero(real.train_labels == i)[:24] for i in range(len(CLASSES))])
    result = M.compute_metrics(real.train[pick], real.train_labels[pick], real, judge.path, params.eval, utility=False)
    assert result.values[mk.MEMORISATION_SHARE] == 1.0
    assert result.values[mk.MEMORISATION_SHARE_FEATURE] == 1.0
    assert result.values[mk.NN_TRAIN_DIST_PIXEL] == 0.0 < result.values[mk.NN_TRAIN_DIST_PIXEL + mk.REF_SUFFIX]
    assert result.protocol["utility"] == {"computed": False} and mk.TSTR_ACC not in result.values


def test_real_features_are_cached_per_data_version(setup):
    params, real, judge, labels, fresh, first, root = setup
    again = M.compute_metrics(fresh, labels, real, judge.path, params.eval, cache_dir=root / "cache")
    assert again.protocol["domain_extractor"]["features_cached"] is True
    assert again.protocol["utility"]["trtr"]["cached"] is True
    assert again.values == first.values
    assert len(list((root / "cache").glob("features-radsynth-domain-*.npz"))) == 1


def test_bad_generated_array_is_a_clear_error(setup):
    params, real, judge, labels, fresh, *_ = setup
    from radsynth.errors import RadsynthError

    with pytest.raises(RadsynthError, match="uint8"):
        M.compute_metrics(fresh.astype(np.float32), labels, real, judge.path, params.eval)
