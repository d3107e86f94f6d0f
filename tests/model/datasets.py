"""Small synthetic datasets in the radsynth.dataset format (uint8, levels 4..res)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from radsynth.dataset import Dataset, save_dataset


def make_dataset(root: Path, n: int = 48, res: int = 16, classes=("A", "B", "C"), channels: int = 1, seed: int = 0) -> Dataset:
    """Class-dependent checkerboard-ish patterns on noise; levels by 2x2 box averaging."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    yy, xx = np.mgrid[0:res, 0:res]
    cell = max(res // 4, 1)
    full = np.zeros((n, channels, res, res), np.float32)
    for i, label in enumerate(labels):
        img = 40 + rng.normal(0, 10, (channels, res, res))
        img[:, (yy // cell + xx // cell) % len(classes) == label] += 150
        full[i] = img
    levels, x, r = {}, full, res
    while r >= 4:
        levels[r] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        x = x.reshape(n, channels, r // 2, 2, r // 2, 2).mean(axis=(3, 5))
        r //= 2
    n_eval = max(n // 8, 1)
    splits = ["train"] * (n - 2 * n_eval) + ["val"] * n_eval + ["test"] * n_eval
    return save_dataset(root, levels, [f"p{i}" for i in range(n)], labels, splits, list(classes), extra_meta={"data_md5": "synthetic"})
