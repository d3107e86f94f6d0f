"""Small seeded image datasets for the evaluation, export and registry tests.

Three conditions with distinct structure (two dark "lung fields", with a bright left blob
or a diffuse speckle), random shifts, contrast and noise, so a classifier can separate
them and a distance can tell real from noise, at 16x16 (levels 4, 8, 16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from radsynth.dataset import Dataset, save_dataset

CLASSES = ("NORMAL", "PNEUMONIA_BACTERIAL", "PNEUMONIA_VIRAL")


def synth_images(labels: np.ndarray, res: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [N, 1, res, res] images whose structure depends on the label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1) * 2 - 1  # [-1, 1]
    out = np.empty((len(labels), 1, res, res), np.uint8)
    for n, label in enumerate(labels):
        dx, dy = rng.normal(0, 0.06, 2)
        img = 0.7 - 0.2 * (xx ** 2 + yy ** 2)
        for cx in (-0.45, 0.45):
            lung = ((xx - cx - dx) / 0.32) ** 2 + ((yy - dy) / 0.6) ** 2 < 1
            img = np.where(lung, img - 0.5, img)
        if label == 1:
            img += 0.6 * np.exp(-(((xx + 0.45 - dx) ** 2 + (yy - 0.2 - dy) ** 2) / 0.05))
        elif label == 2:
            img += 0.25 * (rng.random((res, res)) > 0.7) * (np.abs(xx) > 0.15)
        img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.05, (res, res))
        out[n, 0] = np.clip((img + 0.2) / 1.2 * 255, 0, 255).astype(np.uint8)
    return out


def _downsample(images: np.ndarray, res: int) -> np.ndarray:
    f = images.shape[-1] // res
    n, c = images.shape[:2]
    return images.reshape(n, c, res, f, res, f).astype(np.float32).mean(axis=(3, 5)).round().astype(np.uint8)


def make_dataset(root: Path, per_class: dict[str, int] | None = None, res: int = 16, seed: int = 0) -> Dataset:
    """Write a dataset (radsynth.dataset format) with ``per_class`` images per split and condition."""
    per_class = per_class or {"train": 60, "val": 20, "test": 20}
    labels, splits = [], []
    for split, n in per_class.items():
        for i in range(len(CLASSES)):
            labels += [i] * n
            splits += [split] * n
    labels = np.array(labels)
    full = synth_images(labels, res, seed)
    levels = {r: _downsample(full, r) for r in (4, 8, 16) if r <= res}
    levels[res] = full
    patients = [f"p{i:05d}" for i in range(len(labels))]
    return save_dataset(root, levels, patients, labels, splits, CLASSES, extra_meta={"source": "synthetic test data"})


def tiny_generator(num_classes: int = 3, res: int = 16, seed: int = 0):
    """A freshly initialised (untrained) generator at full resolution, from the model helper's API."""
    import torch

    from model.registry import build_networks
    from radsynth.config import load_params

    params = load_params(profile="tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G, _ = build_networks(params.model, num_classes, 1, res)
    return G.eval()


def save_tiny_generator(path: Path, num_classes: int = 3, res: int = 16, seed: int = 0) -> Path:
    """An untrained generator checkpoint (model.checkpoint format)."""
    from model.checkpoint import save_generator

    G = tiny_generator(num_classes, res, seed)
    return save_generator(path, G, {"classes": list(CLASSES[:num_classes]), "data_md5": "test-md5", "params_digest": "test-digest"})


def eval_params(root: Path, **overrides):
    """The tiny profile with every path under ``root`` (no Inception weights, local MLflow)."""
    from radsynth.config import load_params

    values = {
        "paths.artifacts": str(root / "artifacts"),
        "paths.mlflow_uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "paths.mlflow_artifacts": str(root / "mlruns" / "artifacts"),
        "eval.cache_dir": str(root / "cache"),
        "eval.inception_weights": str(root / "no-inception-weights.pth"),
        **overrides,
    }
    return load_params(profile="tiny", overrides=values)


def param_flags(params_overrides: dict) -> list[str]:
    """``--set`` flags for the CLI matching :func:`eval_params`."""
    flags = ["--profile", "tiny"]
    for k, v in params_overrides.items():
        flags += ["--set", f"{k}={v}"]
    return flags
