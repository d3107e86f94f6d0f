"""Utility of the generated images for a downstream classifier (reported, not gated).

Every classifier here is the judge's recipe (:func:`model.classifier.train_classifier`: the
same architecture and budget, trained to convergence with early stopping on the real
validation split) and is scored on the real test split, over ``eval.utility.seeds`` seeds
(mean and sd):

* **TSTR / TRTR**: trained on the generated set vs on real training images with the same
  count per condition (size-matched), so the two differ only in where the images came from.
  Sanity check: TRTR's balanced accuracy must be within ``eval.utility.trtr_tolerance`` of the
  judge's own (trained on the whole training split); when it is not, the utility
  classifiers are not trained well enough to mean anything and the evaluation says so.
* **Augmentation** (the claim that synthetic data fixes scarcity and class imbalance): a
  stratified ``eval.utility.augment_real_fraction`` of the real training split, alone vs plus
  generated images that bring every condition up to the largest one's count (class-balanced);
  balanced accuracy and the recall of the rarest training condition.

Classifiers trained on real images only depend on the data and the recipe, so their scores
are cached beside the judge; only the ones that see generated images are trained per call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from radsynth import metric_keys as mk


@dataclasses.dataclass(frozen=True)
class UtilityResult:
    values: dict[str, float]             # flat, keys from radsynth.metric_keys
    protocol: dict                       # sizes, seeds, minority condition, cache use
    sanity_passed: bool                  # TRTR within tolerance of the judge
    sanity_detail: str


def _score(model, real, classes: Sequence[str]) -> dict[str, float]:
    from model import classifier as clf

    pred = clf.predict_proba(model, real.test).argmax(1)
    bal, per = clf.balanced_accuracy(pred, real.test_labels, len(classes))
    return {"acc": float((pred == real.test_labels).mean()), "balanced": bal, **{c: a for c, a in zip(classes, per)}}


def _train_and_score(images: np.ndarray, labels: np.ndarray, real, recipe, seeds: Sequence[int], classes: Sequence[str]) -> list[dict]:
    from model import classifier as clf

    out = []
    for seed in seeds:
        model, record = clf.train_classifier(images, labels, len(classes), recipe, seed=seed, val=(real.val, real.val_labels))
        out.append({**_score(model, real, classes), "epochs": record.epochs, "best_epoch": record.best_epoch})
    return out


def _cached(cache_dir: Path | None, key: dict, compute) -> tuple[list[dict], bool]:
    from radsynth.io import write_json

    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"utility-real-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["scores"], True
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)
    scores = compute()
    write_json(path, {"key": key, "scores": scores})
    return scores, False


def _summarise(values: dict[str, float], scores: list[dict], key: str, balanced_key: str, classes: Sequence[str]) -> None:
    values[key] = float(np.mean([s["acc"] for s in scores]))
    values[key + mk.SD_SUFFIX] = float(np.std([s["acc"] for s in scores]))
    values[balanced_key] = float(np.mean([s["balanced"] for s in scores]))
    values[balanced_key + mk.SD_SUFFIX] = float(np.std([s["balanced"] for s in scores]))
    for c in classes:
        values[mk.per_class(key, c)] = float(np.mean([s[c] for s in scores]))


def stratified_subset(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Indices of ``fraction`` of each class (at least 2 per class), seeded."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(num_classes):
        pool = np.flatnonzero(labels == i)
        n = min(len(pool), max(2, int(round(fraction * len(pool)))))
        parts.append(np.sort(rng.choice(pool, n, replace=False)))
    return np.concatenate(parts)


def utility(generated: np.ndarray, gen_labels: np.ndarray, real, recipe, cfg, seed: int, judge_balanced: float,
            cache_dir: str | Path | None = None) -> UtilityResult:
    """TSTR / TRTR and augmentation utility (see the module docstring).

    Args:
        generated: uint8 ``[N, C, R, R]`` generated images; ``gen_labels`` their conditions.
        real: :class:`model.metrics.RealSplits` at resolution R.
        recipe: the judge's recipe (:class:`radsynth.config.JudgeConfig`).
        cfg: :class:`radsynth.config.UtilityConfig`.
        seed: base seed (``eval.seed``); classifier ``j`` uses ``seed + 1000 + j``.
        judge_balanced: the judge's balanced accuracy on real test images (the sanity check's target).
        cache_dir: where real-only scores are kept (``None``: no cache).

    Returns:
        :class:`UtilityResult`.
    """
    from model.metrics.families import reference_draws

    classes = list(real.classes)
    k = len(classes)
    seeds = [seed + 1000 + j for j in range(max(1, cfg.seeds))]
    recipe_key = {"recipe": dataclasses.asdict(recipe), "seeds": seeds, "data": real.identity}
    from model.classifier import ARCH_VERSION

    recipe_key["arch"] = ARCH_VERSION
    values: dict[str, float] = {}

    # TSTR / TRTR, size-matched.
    trtr_pick = reference_draws(gen_labels, real.train_labels, k, 1, seed + 999)[0]
    counts = [int((real.train_labels[trtr_pick] == i).sum()) for i in range(k)]
    trtr, trtr_cached = _cached(cache_dir, {**recipe_key, "experiment": "trtr", "counts": counts},
                                lambda: _train_and_score(real.train[trtr_pick], real.train_labels[trtr_pick], real, recipe, seeds, classes))
    tstr = _train_and_score(generated, gen_labels, real, recipe, seeds, classes)
    _summarise(values, tstr, mk.TSTR_ACC, mk.TSTR_BALANCED_ACC, classes)
    _summarise(values, trtr, mk.TRTR_ACC, mk.TRTR_BALANCED_ACC, classes)
    gap = float(judge_balanced - values[mk.TRTR_BALANCED_ACC])
    values[mk.TRTR_GAP] = gap
    sane = bool(np.isfinite(gap) and gap <= cfg.trtr_tolerance)
    detail = (f"TRTR balanced accuracy {values[mk.TRTR_BALANCED_ACC]:.3f} is {gap:+.3f} from the judge's {judge_balanced:.3f} "
              f"({'within' if sane else 'outside'} the tolerance {cfg.trtr_tolerance:g})")

    # Augmentation: scarce, imbalanced real subset alone vs + class-balancing synthetic images.
    full_counts = np.bincount(real.train_labels, minlength=k)
    minority = int(np.argmin(full_counts))
    subset = stratified_subset(real.train_labels, cfg.augment_real_fraction, k, seed + 998)
    sub_counts = np.bincount(real.train_labels[subset], minlength=k)
    rng = np.random.default_rng(seed + 997)
    extra = []
    for i in range(k):
        pool = np.flatnonzero(gen_labels == i)
        extra.append(rng.permutation(pool)[: max(0, int(sub_counts.max() - sub_counts[i]))])
    extra = np.concatenate(extra)
    real_only, aug_cached = _cached(cache_dir, {**recipe_key, "experiment": "augment-real-only", "fraction": cfg.augment_real_fraction},
                                    lambda: _train_and_score(real.train[subset], real.train_labels[subset], real, recipe, seeds, classes))
    augmented = _train_and_score(np.concatenate([real.train[subset], generated[extra]]),
                                 np.concatenate([real.train_labels[subset], gen_labels[extra]]), real, recipe, seeds, classes)
    for scores, bal_key, min_key in ((augmented, mk.AUG_BALANCED_ACC, mk.AUG_MINORITY_RECALL),
                                     (real_only, mk.AUG_REAL_BALANCED_ACC, mk.AUG_REAL_MINORITY_RECALL)):
        values[bal_key] = float(np.mean([s["balanced"] for s in scores]))
        values[bal_key + mk.SD_SUFFIX] = float(np.std([s["balanced"] for s in scores]))
        values[min_key] = float(np.mean([s[classes[minority]] for s in scores]))
        values[min_key + mk.SD_SUFFIX] = float(np.std([s[classes[minority]] for s in scores]))

    protocol = {
        "recipe": "the judge's (eval.judge), early-stopped on the real val split; scored on the real test split",
        "seeds": seeds,
        "tstr": {"train_images": {c: int((gen_labels == i).sum()) for i, c in enumerate(classes)},
                 "epochs": [s["epochs"] for s in tstr]},
        "trtr": {"train_images": dict(zip(classes, counts)), "cached": trtr_cached, "epochs": [s["epochs"] for s in trtr]},
        "sanity": {"passed": sane, "detail": detail, "tolerance": cfg.trtr_tolerance, "judge_balanced_acc": judge_balanced},
        "augment": {"real_fraction": cfg.augment_real_fraction, "real_images": dict(zip(classes, map(int, sub_counts))),
                    "synthetic_images": {c: int((gen_labels[extra] == i).sum()) for i, c in enumerate(classes)},
                    "minority_condition": classes[minority], "real_only_cached": aug_cached},
    }
    return UtilityResult(values, protocol, sane, detail)
