"""One function per metric family, each on plain arrays (testable on tiny ones).

Every family returns a flat ``{key: float}`` dict keyed by :mod:`radsynth.metric_keys`, overall
under the bare key and per condition as ``per_class(key, name)``; :func:`groups` is the one
overall-plus-per-condition loop they share. Real-vs-real references carry the ``_ref`` suffix
(``_ref_sd`` for their spread): they come from *size-matched draws* of the real training split
(:func:`reference_draws`): for each draw, as many training images of each condition as the
generated set has, compared with the real test split exactly as the generated set is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from radsynth import metric_keys as mk


@dataclasses.dataclass(frozen=True)
class Group:
    """All images (``index`` None) or one condition."""

    name: str | None                     # condition name; None: overall
    index: int | None                    # class index; None: overall

    def key(self, key: str) -> str:
        return key if self.name is None else mk.per_class(key, self.name)

    def mask(self, labels: np.ndarray) -> np.ndarray:
        return np.ones(len(labels), bool) if self.index is None else np.asarray(labels) == self.index


def groups(classes: Sequence[str]) -> list[Group]:
    """Overall first, then one group per condition."""
    return [Group(None, None)] + [Group(c, i) for i, c in enumerate(classes)]


def reference_draws(gen_labels: np.ndarray, train_labels: np.ndarray, num_classes: int, draws: int, seed: int) -> list[np.ndarray]:
    """Index arrays into the training split, each with the generated set's count per condition.

    A condition with fewer training images than generated ones contributes all of them
    (the reference is then smaller than the generated set; ``protocol`` records the counts).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(max(1, draws)):
        parts = []
        for i in range(num_classes):
            pool = np.flatnonzero(train_labels == i)
            n = min(int((gen_labels == i).sum()), len(pool))
            parts.append(np.sort(rng.choice(pool, n, replace=False)))
        out.append(np.concatenate(parts))
    return out


# --------------------------------------------------------------------------------------
# Distances (torch-fidelity's FID / KID on features)
# --------------------------------------------------------------------------------------


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between two feature sets (torch-fidelity's implementation)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(torch.as_tensor(f1, dtype=torch.float64))
    s2 = fid_features_to_statistics(torch.as_tensor(f2, dtype=torch.float64))
    return float(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"])


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int, subset_size: int, seed: int) -> float:
    """KID (polynomial kernel MMD, mean over subsets) via torch-fidelity; subset size clipped."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = max(2, min(subset_size, len(f1), len(f2)))
    out = kid_features_to_metric(torch.as_tensor(f1), torch.as_tensor(f2), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out["kernel_inception_distance_mean"])


def distances(gen_f: np.ndarray, gen_labels: np.ndarray, train_f: np.ndarray, train_labels: np.ndarray,
              test_f: np.ndarray, test_labels: np.ndarray, classes: Sequence[str], draws: list[np.ndarray],
              fid_key: str, kid_key: str, units_key: str, kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, float]:
    """FID / KID of generated vs real test, and the same for each size-matched training draw.

    Keys per group: ``fid_key`` (generated vs test), ``fid_key_ref`` / ``_ref_sd`` (mean / sd over
    the draws), ``units_key`` = generated / reference mean (the gate's unit); KID likewise
    without units (it is near 0 for real data and may be negative).
    """
    values: dict[str, float] = {}
    for g in groups(classes):
        gm, tm = g.mask(gen_labels), g.mask(test_labels)
        if gm.sum() < 2 or tm.sum() < 2:
            continue
        values[g.key(fid_key)] = fid = fid_from_features(gen_f[gm], test_f[tm])
        values[g.key(kid_key)] = kid_from_features(gen_f[gm], test_f[tm], kid_subsets, kid_subset_size, seed)
        ref_fid, ref_kid = [], []
        for d in draws:
            ref = d[g.mask(train_labels[d])]
            if len(ref) < 2:
                continue
            ref_fid.append(fid_from_features(train_f[ref], test_f[tm]))
            ref_kid.append(kid_from_features(train_f[ref], test_f[tm], kid_subsets, kid_subset_size, seed))
        if ref_fid:
            values[g.key(fid_key) + mk.REF_SUFFIX] = ref = float(np.mean(ref_fid))
            values[g.key(fid_key) + mk.REF_SD_SUFFIX] = float(np.std(ref_fid))
            values[g.key(kid_key) + mk.REF_SUFFIX] = float(np.mean(ref_kid))
            values[g.key(kid_key) + mk.REF_SD_SUFFIX] = float(np.std(ref_kid))
            values[g.key(units_key)] = fid / ref if ref > 0 else float("inf")
    return values


# --------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds, Kynkaanniemi et al. 2019)
# --------------------------------------------------------------------------------------


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """``(precision, recall)`` of ``gen`` against ``real`` via torch-fidelity.

    Precision: the share of generated samples inside the real manifold (fidelity);
    recall: the share of real samples inside the generated manifold (coverage). A collapsed
    generator has high precision and recall near 0.
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    k = max(1, min(k, len(gen) - 1, len(real) - 1))
    p, r = calculate_precision_recall_full(torch.as_tensor(gen, dtype=torch.float32),
                                           torch.as_tensor(real, dtype=torch.float32), neighborhood=k)
    return float(p), float(r)


def precision_recall_family(gen_f: np.ndarray, gen_labels: np.ndarray, train_f: np.ndarray, train_labels: np.ndarray,
                            test_f: np.ndarray, test_labels: np.ndarray, classes: Sequence[str], draws: list[np.ndarray],
                            k: int) -> dict[str, float]:
    """Precision and recall of generated vs test per group, with the draws' mean as reference."""
    values: dict[str, float] = {}
    for g in groups(classes):
        gm, tm = g.mask(gen_labels), g.mask(test_labels)
        if gm.sum() < 2 or tm.sum() < 2:
            continue
        values[g.key(mk.PRECISION)], values[g.key(mk.RECALL)] = precision_recall(gen_f[gm], test_f[tm], k)
        refs = [precision_recall(train_f[d[g.mask(train_labels[d])]], test_f[tm], k) for d in draws
                if g.mask(train_labels[d]).sum() >= 2]
        if refs:
            values[g.key(mk.PRECISION) + mk.REF_SUFFIX] = float(np.mean([p for p, _ in refs]))
            values[g.key(mk.RECALL) + mk.REF_SUFFIX] = float(np.mean([r for _, r in refs]))
    return values


# --------------------------------------------------------------------------------------
# SSIM family (model.ssim: the project's one definition)
# --------------------------------------------------------------------------------------


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] -> float32 [N, D] in [-1, 1], scaled so distances are per-pixel RMS."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
    return flat / np.sqrt(flat.shape[1])


def nearest(query: np.ndarray, bank: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean nearest neighbour of each query row in ``bank``: ``(distance [n], index [n])``."""
    q = torch.as_tensor(query.reshape(len(query), -1), dtype=torch.float32)
    b = torch.as_tensor(bank.reshape(len(bank), -1), dtype=torch.float32)
    dists, idx = [], []
    for part in q.split(chunk):
        d = torch.cdist(part, b)  # [n, m]
        v, i = d.min(dim=1)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists).numpy().astype(np.float64), torch.cat(idx).numpy()


def ssim_family(generated: np.ndarray, gen_labels: np.ndarray, reference: np.ndarray, ref_labels: np.ndarray,
                test: np.ndarray, test_labels: np.ndarray, classes: Sequence[str], pairs: int, seed: int) -> dict[str, float]:
    """SSIM / MS-SSIM of each generated image to its nearest real test image of the same condition
    (pixel L2), and MS-SSIM among generated images of a condition (diversity: high = collapse).

    ``reference`` (a size-matched real training draw) gets the same treatment: the ``_ref`` values.
    """
    from model.ssim import ms_ssim, ssim

    rng = np.random.default_rng(seed)
    values: dict[str, float] = {}
    pooled: dict[str, list[np.ndarray]] = {}

    def add(key: str, group_key: str, v: np.ndarray) -> None:
        values[group_key] = float(v.mean())
        pooled.setdefault(key, []).append(v)

    for g in groups(classes)[1:]:
        t = test[g.mask(test_labels)]
        if len(t) == 0:
            continue
        for suffix, imgs in (("", generated[g.mask(gen_labels)]), (mk.REF_SUFFIX, reference[g.mask(ref_labels)])):
            if len(imgs) == 0:
                continue
            _, nn_idx = nearest(pixels(imgs), pixels(t))
            add(mk.SSIM_NEAREST + suffix, g.key(mk.SSIM_NEAREST) + suffix, ssim(imgs, t[nn_idx]))
            add(mk.MS_SSIM_NEAREST + suffix, g.key(mk.MS_SSIM_NEAREST) + suffix, ms_ssim(imgs, t[nn_idx]))
            if len(imgs) >= 2:
                a = rng.integers(0, len(imgs), pairs)
                b = (a + rng.integers(1, len(imgs), pairs)) % len(imgs)  # never the same image
                add(mk.MS_SSIM_DIVERSITY + suffix, g.key(mk.MS_SSIM_DIVERSITY) + suffix, ms_ssim(imgs[a], imgs[b]))
    for key, parts in pooled.items():
        values[key] = float(np.concatenate(parts).mean())
    return values


# --------------------------------------------------------------------------------------
# Condition accuracy (the judge on generated images of each requested condition)
# --------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[requested, predicted]`` counts."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(pred)), 1)
    return out


def condition_accuracy(gen_probs: np.ndarray, gen_labels: np.ndarray, test_probs: np.ndarray, test_labels: np.ndarray,
                       classes: Sequence[str]) -> dict[str, float]:
    """The judge's accuracy and confidence in the requested condition, beside its accuracy on real test images.

    ``real_acc/<c>`` is the ceiling the gate's relative rule reads; ``real_balanced_acc`` the
    judge's headline quality (mean of the per-condition accuracies on real test images).
    """
    values: dict[str, float] = {}
    gen_pred, test_pred = gen_probs.argmax(1), test_probs.argmax(1)
    for g in groups(classes):
        gm, tm = g.mask(gen_labels), g.mask(test_labels)
        if gm.any():
            values[g.key(mk.COND_ACC)] = float((gen_pred[gm] == gen_labels[gm]).mean())
            values[g.key(mk.COND_CONF)] = float(gen_probs[gm, gen_labels[gm]].mean())
        if tm.any():
            values[g.key(mk.REAL_ACC)] = float((test_pred[tm] == test_labels[tm]).mean())
    per = [values[mk.per_class(mk.REAL_ACC, c)] for c in classes if mk.per_class(mk.REAL_ACC, c) in values]
    if per:
        values[mk.REAL_BALANCED_ACC] = float(np.mean(per))
    return values


# --------------------------------------------------------------------------------------
# Memorisation: nearest training image, pixel and feature space, against test-to-train
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memorisation:
    values: dict[str, float]
    nearest_train: np.ndarray            # [N] index of each generated image's nearest training image (pixels, shift-tolerant)
    distance: np.ndarray                 # [N] that distance (per-pixel RMS over the interior)
    thresholds: dict[str, float]         # "pixel", "feature": the test-to-train percentile


def shift_tolerant_nearest(query: np.ndarray, bank: np.ndarray, max_shift: int, candidates: int = 8,
                           chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Nearest image of ``bank`` to each ``query`` image allowing a translation of up to ``max_shift`` px.

    The distance is the per-pixel RMS (images in [-1, 1]) between the query's interior (a
    ``max_shift`` border cut off) and the best-aligned window of a bank image. Candidates are the
    ``candidates`` nearest bank images at a quarter of the resolution (where a small shift barely
    moves anything); a shifted copy of a training image is at distance 0.

    Args:
        query, bank: uint8 ``[n, C, H, W]`` and ``[m, C, H, W]``.

    Returns:
        ``(distance [n], index into bank [n])``.
    """
    import torch.nn.functional as F

    q = torch.as_tensor(query, dtype=torch.float32) / 127.5 - 1.0  # [n, C, H, W]
    b = torch.as_tensor(bank, dtype=torch.float32) / 127.5 - 1.0   # [m, C, H, W]
    h, w = q.shape[-2:]
    factor = 4 if min(h, w) >= 32 else 2
    qs, bs = F.avg_pool2d(q, factor).flatten(1), F.avg_pool2d(b, factor).flatten(1)
    k = min(candidates, len(b))
    s = max(0, int(max_shift))
    inner = q[:, :, s:h - s, s:w - s]
    best_d = torch.full((len(q),), float("inf"))
    best_i = torch.zeros(len(q), dtype=torch.int64)
    for start in range(0, len(q), chunk):
        sl = slice(start, start + chunk)
        cand = torch.cdist(qs[sl], bs).topk(k, largest=False).indices  # [c, k]
        bank_c = b[cand]  # [c, k, C, H, W]
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                win = bank_c[..., s + dy:h - s + dy, s + dx:w - s + dx]  # [c, k, C, h', w']
                d = (inner[sl, None] - win).pow(2).mean(dim=(2, 3, 4)).sqrt()  # [c, k]
                v, j = d.min(dim=1)
                better = v < best_d[sl]
                best_d[sl] = torch.where(better, v, best_d[sl])
                best_i[sl] = torch.where(better, cand.gather(1, j[:, None])[:, 0], best_i[sl])
    return best_d.numpy().astype(np.float64), best_i.numpy()


def memorisation(generated: np.ndarray, gen_f: np.ndarray, train: np.ndarray, train_f: np.ndarray, test: np.ndarray,
                 test_f: np.ndarray, gen_labels: np.ndarray, classes: Sequence[str], percentile: float,
                 max_shift: int) -> Memorisation:
    """Share of generated images closer to a training image than the closest ``percentile`` % of
    real test images are, in pixel space (allowing a shift of up to ``max_shift`` px, so a
    translated copy counts as a copy) and in the judge's feature space; median nearest distances.

    Args:
        generated, train, test: uint8 ``[N, C, R, R]`` images; ``*_f`` their judge features.
    """
    d_gen_px, i_gen_px = shift_tolerant_nearest(generated, train, max_shift)
    d_test_px, _ = shift_tolerant_nearest(test, train, max_shift)
    d_gen_ft, _ = nearest(gen_f, train_f)
    d_test_ft, _ = nearest(test_f, train_f)
    thr_px, thr_ft = float(np.percentile(d_test_px, percentile)), float(np.percentile(d_test_ft, percentile))
    close_px, close_ft = d_gen_px <= thr_px, d_gen_ft <= thr_ft
    values = {mk.NN_TRAIN_DIST_PIXEL: float(np.median(d_gen_px)), mk.NN_TRAIN_DIST_PIXEL + mk.REF_SUFFIX: float(np.median(d_test_px)),
              mk.NN_TRAIN_DIST_FEATURE: float(np.median(d_gen_ft)), mk.NN_TRAIN_DIST_FEATURE + mk.REF_SUFFIX: float(np.median(d_test_ft))}
    for g in groups(classes):
        gm = g.mask(gen_labels)
        if gm.any():
            values[g.key(mk.MEMORISATION_SHARE)] = float(close_px[gm].mean())
            values[g.key(mk.MEMORISATION_SHARE_FEATURE)] = float(close_ft[gm].mean())
    return Memorisation(values, i_gen_px, d_gen_px, {"pixel": thr_px, "feature": thr_ft})
