"""The prepared dataset on disk: the contract between preprocessing and everything after it.

Layout of a dataset directory (written atomically by :func:`save_dataset`)::

    dataset.json        {"format": 1, "classes": [...], "img_resolution": R, "img_channels": C,
                         "levels": [4, 8, ..., R], "num_images": N, "counts": {...}, ...}
    manifest.csv        index,patient,label,label_index,split   (one row per image, no PHI:
                        ``patient`` is a salted one-way pseudonym)
    images_<res>.npy    uint8 [N, C, res, res] for every res in ``levels``

Images are stored as uint8 and scaled to [-1, 1] only when used (:func:`to_float`), so a
128x128 sample export of 5,216 images is ~114 MB for all levels and loads in milliseconds
with ``mmap``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from radsynth.errors import RadsynthError
from radsynth.io import atomic_dir

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("index", "patient", "label", "label_index", "split")


class DatasetError(RadsynthError, ValueError):
    """A dataset directory is missing or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset directory (arrays are memory-mapped, read-only)."""

    root: Path
    meta: dict
    patients: np.ndarray        # [N] str, pseudonyms
    labels: np.ndarray          # [N] int64 index into classes
    splits: np.ndarray          # [N] str in SPLITS

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def img_resolution(self) -> int:
        return int(self.meta["img_resolution"])

    @property
    def img_channels(self) -> int:
        return int(self.meta["img_channels"])

    @property
    def levels(self) -> list[int]:
        return [int(r) for r in self.meta["levels"]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def mask(self, split: str | None) -> np.ndarray:
        """Boolean [N] selecting one split (``None``: all)."""
        if split is None:
            return np.ones(len(self), dtype=bool)
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.splits == split

    def images(self, res: int | None = None, split: str | None = None) -> np.ndarray:
        """uint8 ``[n, C, res, res]`` for one level (default full resolution) and split."""
        res = res or self.img_resolution
        if res not in self.levels:
            raise DatasetError(f"resolution {res} not in the dataset's levels {self.levels}")
        arr = np.load(self.root / f"images_{res}.npy", mmap_mode="r")
        if split is None:
            return arr
        return arr[self.mask(split)]

    def split_labels(self, split: str | None = None) -> np.ndarray:
        """int64 ``[n]`` labels of one split."""
        return self.labels[self.mask(split)]


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def levels_for(img_resolution: int, min_resolution: int = 4) -> list[int]:
    """Progressive levels ``[min_resolution, ..., img_resolution]`` (powers of two)."""
    for name, value in (("img_resolution", img_resolution), ("min_resolution", min_resolution)):
        if value < 4 or value & (value - 1):
            raise DatasetError(f"{name} must be a power of two >= 4, got {value}")
    if min_resolution > img_resolution:
        raise DatasetError(f"min_resolution {min_resolution} > img_resolution {img_resolution}")
    out, res = [], min_resolution
    while res <= img_resolution:
        out.append(res)
        res *= 2
    return out


def save_dataset(
    root: str | os.PathLike,
    images_by_level: dict[int, np.ndarray],
    patients: Sequence[str],
    labels: Sequence[int],
    splits: Sequence[str],
    classes: Sequence[str],
    extra_meta: dict | None = None,
) -> Dataset:
    """Write a dataset directory atomically and return it loaded.

    Args:
        root: target directory (replaced as a whole on success).
        images_by_level: ``{res: uint8 [N, C, res, res]}`` including the full resolution.
        patients: ``N`` pseudonyms.
        labels: ``N`` class indices into ``classes``.
        splits: ``N`` split names from :data:`SPLITS`.
        classes: class names, index order.
        extra_meta: merged into ``dataset.json`` (counts, source version, seed, ...).
    """
    levels = sorted(images_by_level)
    full = images_by_level[levels[-1]]
    n = full.shape[0]
    for res, arr in images_by_level.items():
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n or arr.shape[2:] != (res, res):
            raise DatasetError(f"level {res}: expected uint8 [{n}, C, {res}, {res}], got {arr.dtype} {arr.shape}")
    if not (len(patients) == len(labels) == len(splits) == n):
        raise DatasetError("patients, labels, splits and images disagree in length")
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise DatasetError(f"unknown split names {bad}")
    labels = np.asarray(labels, dtype=np.int64)
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError("a label index is outside the class list")

    counts = {split: {c: int(((labels == i) & (np.asarray(splits) == split)).sum()) for i, c in enumerate(classes)} for split in SPLITS}
    meta = {
        "format": FORMAT_VERSION,
        "classes": list(classes),
        "img_resolution": int(levels[-1]),
        "img_channels": int(full.shape[1]),
        "levels": [int(r) for r in levels],
        "num_images": int(n),
        "counts": counts,
    }
    meta.update(extra_meta or {})
    with atomic_dir(root) as tmp:
        for res in levels:
            np.save(tmp / f"images_{res}.npy", np.ascontiguousarray(images_by_level[res]))
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for i in range(n):
                writer.writerow((i, patients[i], classes[labels[i]], int(labels[i]), splits[i]))
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return load_dataset(root)


def load_dataset(root: str | os.PathLike) -> Dataset:
    """Load a dataset directory written by :func:`save_dataset`.

    Raises:
        DatasetError: missing files, unknown format, or columns that disagree.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: no dataset.json; run `radsynth preprocess` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise DatasetError(f"{root}: dataset format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    patients, labels, splits = _read_manifest(root / "manifest.csv", meta["classes"])
    if len(labels) != meta["num_images"]:
        raise DatasetError(f"{root}: manifest has {len(labels)} rows, dataset.json says {meta['num_images']}")
    return Dataset(root=root, meta=meta, patients=patients, labels=labels, splits=splits)


def _read_manifest(path: Path, classes: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes = list(classes)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and tuple(rows[0]) != MANIFEST_COLUMNS:
        raise DatasetError(f"{path}: columns {tuple(rows[0])}, expected {MANIFEST_COLUMNS}")
    patients = np.array([r["patient"] for r in rows], dtype=str)
    labels = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
    splits = np.array([r["split"] for r in rows], dtype=str)
    for r in rows:
        if classes[int(r["label_index"])] != r["label"]:
            raise DatasetError(f"{path}: row {r['index']}: label {r['label']!r} disagrees with its index")
    return patients, labels, splits
