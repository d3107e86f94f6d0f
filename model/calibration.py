"""Calibration sets: image sets built from real data that a sound gate must fail (or pass).

Each :class:`CalibrationSet` stands in for a generator: images, their conditions, and what each
gate level must conclude. Every set has the same count per condition (the real validation
split's, capped at ``eval.samples_per_class``), so every set meets the same size-matched reference.

| set | built from | release | demo |
|---|---|---|---|
| noise | Gaussian noise with the real images' mean and sd | fail | fail |
| blurred | real val images, Gaussian blur (sigma 1.5 px at 64x64, scaled up with larger sides, never below 1.5 px) | fail | - |
| checkerboard | real val images + a period-2 checkerboard of 15 % amplitude (+-0.15 x 255) | fail | - |
| shuffled_labels | real val images, conditions permuted across the set | fail | fail |
| collapse | one real val image per condition, repeated | fail | fail |
| verbatim | real training images | fail | fail |
| near_copies | real training images shifted by 2 px (sides repeated) | fail | fail |
| real_val | the real val split under its own labels | pass | pass |

("-": no expectation; a model trained in minutes is allowed to be as blurry as that.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

FAIL, PASS = "fail", "pass"


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    name: str
    description: str
    images: np.ndarray                   # uint8 [N, C, R, R]
    labels: np.ndarray                   # int [N]
    expect: dict[str, str | None]        # level -> "fail" | "pass" | None (no expectation)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of uint8 ``[N, C, H, W]`` (separable, edges repeated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    x = np.pad(images.astype(np.float64), ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    from numpy.lib.stride_tricks import sliding_window_view

    x = sliding_window_view(x, len(g), axis=-1) @ g
    x = sliding_window_view(x, len(g), axis=-2) @ g
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def checkerboard(images: np.ndarray, amplitude: float) -> np.ndarray:
    """Add a period-2 checkerboard of ``+-amplitude x 255`` to uint8 images (clipped)."""
    h, w = images.shape[-2:]
    board = np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1.0, -1.0)  # [H, W]
    return np.clip(np.rint(images.astype(np.float64) + amplitude * 255.0 * board), 0, 255).astype(np.uint8)


def shift(images: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Translate each image by integer ``(dx, dy)`` pixels, repeating the edge rows/columns."""
    out = np.empty_like(images)
    h, w = images.shape[-2:]
    ys, xs = np.arange(h), np.arange(w)
    for i, (a, b) in enumerate(zip(dx, dy)):
        out[i] = images[i][:, np.clip(ys - int(b), 0, h - 1)][:, :, np.clip(xs - int(a), 0, w - 1)]
    return out


def per_class_counts(val_labels: np.ndarray, num_classes: int, cap: int) -> list[int]:
    """Images per condition in every calibration set: the val split's, capped at ``cap``."""
    return [min(int((val_labels == i).sum()), cap) for i in range(num_classes)]


def _pick(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == i), n, replace=False)) for i, n in enumerate(counts)])


def calibration_sets(real, samples_per_class: int, seed: int) -> list[CalibrationSet]:
    """The eight sets of the module docstring, built from ``real`` (:class:`model.metrics.RealSplits`)."""
    rng = np.random.default_rng(seed)
    k = len(real.classes)
    counts = per_class_counts(real.val_labels, k, samples_per_class)
    if min(counts) < 2:
        raise ValueError(f"calibration needs at least 2 validation images per condition, got {counts}")
    vi = _pick(real.val_labels, counts, rng)
    val, val_labels = real.val[vi], real.val_labels[vi]
    ti = _pick(real.train_labels, counts, rng)
    train, train_labels = real.train[ti], real.train_labels[ti]
    res = real.img_resolution
    mean, sd = float(real.train.mean()), float(real.train.std())
    noise = np.clip(np.rint(rng.normal(mean, sd, val.shape)), 0, 255).astype(np.uint8)
    collapse = np.concatenate([np.repeat(val[val_labels == i][:1], n, axis=0) for i, n in enumerate(counts)])
    step = np.where(rng.random(len(train)) < 0.5, -2, 2)
    # 1.5 px at 64x64, scaled with larger sides; never below 1.5 px: at 32x32 a 0.75 px blur is within
    # real-vs-real noise for the judge (measured: PNEUMONIA_VIRAL 0.69 reference units vs real val 1.07).
    sigma = 1.5 * max(1.0, res / 64)
    both = {"release": FAIL, "demo": FAIL}
    return [
        CalibrationSet("noise", "Gaussian noise (the real images' mean and sd)", noise, val_labels, both),
        CalibrationSet("blurred", f"real val images, Gaussian blur sigma {sigma:g} px", blur(val, sigma), val_labels,
                       {"release": FAIL, "demo": None}),
        CalibrationSet("checkerboard", "real val images + period-2 checkerboard, amplitude 15 % (+-38 of 255)",
                       checkerboard(val, 0.15), val_labels, {"release": FAIL, "demo": None}),
        CalibrationSet("shuffled_labels", "real val images, conditions permuted across the set", val,
                       rng.permutation(val_labels), both),
        CalibrationSet("collapse", "one real val image per condition, repeated", collapse, np.repeat(np.arange(k), counts), both),
        CalibrationSet("verbatim", "real training images, unchanged", train, train_labels, both),
        CalibrationSet("near_copies", "real training images shifted 2 px sideways", shift(train, step, np.zeros_like(step)),
                       train_labels, both),
        CalibrationSet("real_val", "the real val split under its own labels", val, val_labels, {"release": PASS, "demo": PASS}),
    ]
