"""The one metrics entry point: generated images + real splits -> a flat dict keyed by constants.

:func:`compute_metrics` composes one function per metric family (:mod:`model.metrics.families`:
distances, precision/recall, the SSIM family, condition accuracy, memorisation;
:mod:`model.metrics.utility`: TSTR/TRTR and augmentation) and returns a :class:`MetricsResult`
whose ``values`` is a flat ``{key: float}`` dict keyed by :mod:`radsynth.metric_keys` (per
condition as ``per_class(key, name)``, overall under the bare key, real-vs-real references with
the ``_ref`` suffix), the metrics that could not be computed honestly under ``unavailable``
(``{key: reason}``), and the ``protocol`` that makes the numbers comparable run to run.

Feature spaces (:mod:`model.metrics.features`): ``*_domain`` is the judge's penultimate layer
(:mod:`model.judge`), ``*_inception`` torch-fidelity's InceptionV3 where its standard weights are
present (never substituted). References are size-matched: real training images drawn with the
generated set's count per condition (``eval.reference_draws`` draws), compared with the real test
split exactly as the generated images are; ``fid_domain_units`` = generated / reference, the unit
the gate reads. SSIM and MS-SSIM are :mod:`model.ssim`, the project's one definition.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from model import classifier as clf
from model.metrics import families as fam
from model.metrics.features import (INCEPTION_EXTRACTOR, INCEPTION_LAYER, INCEPTION_SHA256_PREFIX, FeatureCache,
                                    inception_weights_path, tf_features)
from model.metrics.families import fid_from_features, kid_from_features, nearest, precision_recall
from model.ssim import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_plan, ssim
from radsynth import metric_keys as mk
from radsynth.config import EvalConfig
from radsynth.dataset import Dataset, DatasetError
from radsynth.errors import RadsynthError
from radsynth.io import sha256_file, sha256_files


@dataclasses.dataclass(frozen=True)
class RealSplits:
    """Real images of one dataset at one resolution (uint8 [n, C, R, R]) with labels."""

    classes: tuple[str, ...]
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    test: np.ndarray
    test_labels: np.ndarray
    identity: str                        # sha256 over the dataset files at this resolution

    @property
    def img_resolution(self) -> int:
        return int(self.train.shape[-1])

    @property
    def img_channels(self) -> int:
        return int(self.train.shape[1])


@dataclasses.dataclass(frozen=True)
class MetricsResult:
    values: dict[str, float]             # flat, keys from radsynth.metric_keys
    unavailable: dict[str, str]          # key -> why it was not computed
    protocol: dict                       # extractor, weights hash, sample counts, references, seed
    details: dict = dataclasses.field(default_factory=dict)  # arrays for the figures: confusion, nearest training images


def dataset_identity(dataset: Dataset, res: int) -> str:
    """sha256 over ``dataset.json``, ``manifest.csv`` and ``images_<res>.npy`` (the data version)."""
    return sha256_files(dataset.root / name for name in ("dataset.json", "manifest.csv", f"images_{res}.npy"))


def real_splits(dataset: Dataset, res: int | None = None) -> RealSplits:
    """Load the three splits of ``dataset`` at resolution ``res`` (default: full)."""
    res = res or dataset.img_resolution
    if res not in dataset.levels:
        raise DatasetError(f"{dataset.root}: no level {res} (levels {dataset.levels}); the generator's resolution must be one of them")
    arrays = {}
    for split in ("train", "val", "test"):
        imgs = np.ascontiguousarray(dataset.images(res, split))
        labels = dataset.split_labels(split)
        if len(labels) == 0:
            raise DatasetError(f"{dataset.root}: the {split} split is empty; evaluation needs train, val and test images")
        arrays[split], arrays[f"{split}_labels"] = imgs, labels
    return RealSplits(classes=tuple(dataset.classes), identity=dataset_identity(dataset, res), **arrays)


def compute_metrics(
    generated: np.ndarray,
    gen_labels: np.ndarray,
    real: RealSplits,
    classifier_path: str | os.PathLike,
    cfg: EvalConfig,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    utility: bool | None = None,
) -> MetricsResult:
    """Every metric of the evaluation, per condition and overall.

    Args:
        generated: uint8 ``[N, C, R, R]`` generated images (R = the real splits' resolution).
        gen_labels: int ``[N]`` requested condition of each generated image.
        real: the real splits at resolution R (:func:`real_splits`).
        classifier_path: the judge trained on ``real.train`` (safetensors, :mod:`model.judge`).
        cfg: the ``eval`` section (sample sizes, KID subsets, k, draws, seeds, utility).
        cache_dir: where real-image features and real-only utility scores are kept per data
            version (``None``: no cache).
        progress: show progress bars.
        utility: train the utility classifiers (default ``cfg.utility.enabled``).

    Returns:
        :class:`MetricsResult` (flat values, unavailable metrics with reasons, protocol, details).
    """
    import time

    from tqdm import tqdm

    generated = np.asarray(generated)
    gen_labels = np.asarray(gen_labels, dtype=np.int64)
    if generated.dtype != np.uint8 or generated.ndim != 4 or generated.shape[1:] != real.test.shape[1:]:
        raise RadsynthError(f"generated images must be uint8 {list(real.test.shape[1:])} per image, got {generated.dtype} {list(generated.shape)}")
    if gen_labels.shape != (len(generated),):
        raise RadsynthError("one requested condition per generated image is needed")
    if len(generated) < 2 or gen_labels.min() < 0 or gen_labels.max() >= len(real.classes):
        raise RadsynthError(f"at least two generated images with conditions in 0..{len(real.classes) - 1} are needed")
    use_utility = cfg.utility.enabled if utility is None else utility
    classes = list(real.classes)
    values: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    cache = FeatureCache(cache_dir)
    steps = tqdm(total=7, desc="metrics", unit="step", disable=not progress, leave=False)
    bs = cfg.batch_size
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def done(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now
        steps.update()

    # Judge features: real splits cached per data version + judge hash.
    domain = clf.register_domain_extractor()
    clf_sha = sha256_file(classifier_path)

    def real_domain() -> dict[str, np.ndarray]:
        return {s: tf_features(getattr(real, s), domain, clf.FEATURE_LAYER, str(classifier_path), bs) for s in ("train", "val", "test")}

    real_f, domain_cached = cache.get_or_compute(real.identity, domain, clf_sha, real_domain)
    gen_f = tf_features(generated, domain, clf.FEATURE_LAYER, str(classifier_path), bs)
    done("features")

    # Size-matched real references: training images with the generated count per condition.
    draws = fam.reference_draws(gen_labels, real.train_labels, len(classes), cfg.reference_draws, cfg.seed)
    kid = dict(kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    values.update(fam.distances(gen_f, gen_labels, real_f["train"], real.train_labels, real_f["test"], real.test_labels,
                                classes, draws, mk.FID_DOMAIN, mk.KID_DOMAIN, mk.FID_DOMAIN_UNITS, **kid))

    inc_path, inc_reason = inception_weights_path(cfg)
    inc_sha = ""
    if inc_path is None:
        for key in (mk.FID_INCEPTION, mk.KID_INCEPTION, mk.FID_INCEPTION_UNITS):
            unavailable[key] = inc_reason
    else:
        inc_sha = sha256_file(inc_path)

        def real_inception() -> dict[str, np.ndarray]:
            return {s: tf_features(getattr(real, s), INCEPTION_EXTRACTOR, INCEPTION_LAYER, str(inc_path), bs, 3) for s in ("train", "test")}

        inc_real, _ = cache.get_or_compute(real.identity, INCEPTION_EXTRACTOR, inc_sha, real_inception)
        inc_gen = tf_features(generated, INCEPTION_EXTRACTOR, INCEPTION_LAYER, str(inc_path), bs, 3)
        values.update(fam.distances(inc_gen, gen_labels, inc_real["train"], real.train_labels, inc_real["test"], real.test_labels,
                                    classes, draws, mk.FID_INCEPTION, mk.KID_INCEPTION, mk.FID_INCEPTION_UNITS, **kid))
    done("distances")

    values.update(fam.precision_recall_family(gen_f, gen_labels, real_f["train"], real.train_labels, real_f["test"], real.test_labels,
                                              classes, draws, cfg.prc_neighborhood))
    done("precision_recall")

    values.update(fam.ssim_family(generated, gen_labels, real.train[draws[0]], real.train_labels[draws[0]], real.test,
                                  real.test_labels, classes, cfg.diversity_pairs, cfg.seed))
    done("ssim")

    model, clf_meta = clf.load_classifier(classifier_path)
    gen_probs, test_probs = clf.predict_proba(model, generated), clf.predict_proba(model, real.test)
    values.update(fam.condition_accuracy(gen_probs, gen_labels, test_probs, real.test_labels, classes))
    confusion = fam.confusion(gen_probs.argmax(1), gen_labels, len(classes))
    done("condition")

    max_shift = max(1, round(cfg.memorisation_shift * real.img_resolution)) if cfg.memorisation_shift > 0 else 0
    mem = fam.memorisation(generated, gen_f, real.train, real_f["train"], real.test, real_f["test"], gen_labels, classes,
                           cfg.memorisation_percentile, max_shift)
    values.update(mem.values)
    done("memorisation")

    util_protocol: dict = {"computed": False}
    if use_utility:
        from model.metrics.utility import utility as utility_family

        util = utility_family(generated, gen_labels, real, cfg.judge, cfg.utility, cfg.seed, values[mk.REAL_BALANCED_ACC], cache_dir)
        values.update(util.values)
        util_protocol = {"computed": True, **util.protocol}
    done("utility")
    steps.close()

    win, scales = ms_ssim_plan(real.img_resolution)
    protocol = {
        "seed": cfg.seed,
        "classes": classes,
        "img_resolution": real.img_resolution,
        "img_channels": real.img_channels,
        "samples": {"generated": {c: int((gen_labels == i).sum()) for i, c in enumerate(classes)},
                    "train": int(len(real.train)), "val": int(len(real.val)), "test": int(len(real.test))},
        "real_set": "test split (generated vs test; per condition against the same condition)",
        "reference": {"what": "real train images drawn with the generated set's count per condition, vs the real test split "
                              "(suffix _ref: mean over the draws; _ref_sd: their sd)",
                      "draws": len(draws), "images_per_draw": {c: int((real.train_labels[draws[0]] == i).sum()) for i, c in enumerate(classes)},
                      "units": f"{mk.FID_DOMAIN_UNITS} = {mk.FID_DOMAIN} / {mk.FID_DOMAIN}{mk.REF_SUFFIX}"},
        "resize": ("none for domain metrics, SSIM and memorisation: real images are the dataset level at the "
                   "generator's resolution; Inception: grayscale repeated to 3 channels, torch-fidelity "
                   "TF1-compatible bilinear resize to 299x299"),
        "domain_extractor": {"name": domain, "layer": clf.FEATURE_LAYER, "weights_sha256": clf_sha,
                             "feature_dim": int(gen_f.shape[1]), "features_cached": domain_cached,
                             "trained_on": "real train split", "data_identity": clf_meta.get("data_identity", "")},
        "inception_extractor": ({"name": INCEPTION_EXTRACTOR, "layer": INCEPTION_LAYER, "weights_path": str(inc_path),
                                 "weights_sha256": inc_sha, "sha256_matches_file_name": inc_sha.startswith(INCEPTION_SHA256_PREFIX)}
                                if inc_path else {"available": False, "reason": inc_reason}),
        "kid": {"subsets": cfg.kid_subsets, "subset_size": cfg.kid_subset_size, "kernel": "poly3"},
        "prc": {"neighborhood": cfg.prc_neighborhood, "space": "domain"},
        "ms_ssim": {"window": win, "scales": scales, "sigma": 1.5 * win / 11, "data_range": 2.0,
                    "weights": list(MS_SSIM_WEIGHTS[:scales]), "diversity_pairs": cfg.diversity_pairs, "definition": "model.ssim"},
        "ssim": {"window": win, "pairing": "nearest real test image of the same condition (pixel L2)", "definition": "model.ssim"},
        "confusion": {"rows": "requested condition", "columns": "judge's prediction", "matrix": confusion.tolist()},
        "utility": util_protocol,
        "memorisation": {"percentile": cfg.memorisation_percentile, "threshold_pixel": mem.thresholds["pixel"],
                         "threshold_feature": mem.thresholds["feature"],
                         "pixel_distance": f"RMS over pixels in [-1, 1], best alignment within +-{max_shift} px (interior)",
                         "max_shift_px": max_shift, "feature_distance": "L2, domain features"},
        "data_identity": real.identity,
        "seconds": timings,
    }
    details = {"confusion": confusion, "nearest_train": mem.nearest_train, "nearest_distance": mem.distance}
    return MetricsResult(values=values, unavailable=unavailable, protocol=protocol, details=details)


def describe(values: dict[str, float], classes: Sequence[str]) -> str:
    """A short human-readable table of the main metrics (for logs)."""
    keys = (mk.FID_DOMAIN_UNITS, mk.FID_DOMAIN, mk.PRECISION, mk.RECALL, mk.COND_ACC, mk.REAL_ACC, mk.MS_SSIM_DIVERSITY,
            mk.MEMORISATION_SHARE)
    rows = [f"{'condition':<24}" + "".join(f"{k:>20}" for k in keys)]
    for c in [None, *classes]:
        name = "overall" if c is None else c
        cells = []
        for k in keys:
            v = values.get(k if c is None else mk.per_class(k, c))
            cells.append(f"{v:>20.4g}" if v is not None else f"{'-':>20}")
        rows.append(f"{name:<24}" + "".join(cells))
    return "\n".join(rows)


def json_safe(values: dict[str, float]) -> dict[str, float | None]:
    """NaN/inf -> None, so the JSON stays valid."""
    return {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in values.items()}


__all__ = ["RealSplits", "MetricsResult", "compute_metrics", "real_splits", "dataset_identity",
           "inception_weights_path", "ssim", "ms_ssim", "ms_ssim_plan", "nearest", "fid_from_features",
           "kid_from_features", "precision_recall", "describe", "json_safe", "FeatureCache"]
