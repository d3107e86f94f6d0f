"""Step ``preprocess``: ingest output -> the prepared dataset (``radsynth.dataset`` format).

* Levels: every power of two from ``data.min_resolution`` to ``data.img_resolution``, each an
  exact area average of the full-resolution images (uint8; :func:`radsynth.dataset.to_float`
  scales to [-1, 1] when used).
* Split: train/val/test by PATIENT (``data.split_*``, 80/10/10 by default), stratified by each
  patient's label (the most frequent label among the patient's studies; ties to the first
  class), deterministic for a given seed and salt. No patient is in two splits.
* Ingest's quarantine counts travel in ``dataset.json`` (``ingest``) so validation can gate on
  the share of images dropped for quality (``data.max_quality_fraction``): one near-black image
  is quarantined, a dataset that loses many is refused.
* Augmentation only when params say so: ``data.hflip: true`` appends a left-right mirrored copy
  of every TRAINING image (same patient, same label; val/test untouched). Off by default: on a
  chest radiograph the heart is on the left, and a mirrored chest is a different anatomy.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from radsynth.config import DataConfig, Params
from radsynth.dataset import SPLITS, levels_for, save_dataset
from radsynth.errors import RadsynthError

STEP = "preprocess"
INGEST_STEP = "ingest"


class PreprocessError(RadsynthError, ValueError):
    """The ingest output is missing or inconsistent, or the split fractions are invalid."""


@dataclasses.dataclass(frozen=True)
class PreprocessResult:
    out_dir: Path
    num_images: int
    levels: tuple[int, ...]
    classes: tuple[str, ...]
    split_counts: dict[str, int]               # images per split
    split_patients: dict[str, int]             # patients per split
    augmented: int                             # mirrored copies appended (hflip)


def split_patients(patients: np.ndarray, labels: np.ndarray, num_classes: int, cfg: DataConfig, seed: int) -> np.ndarray:
    """Assign every image a split so that each patient lies in exactly one split.

    Patients are grouped by their majority label; inside each group they are shuffled with
    ``numpy.random.default_rng(seed)`` (after sorting, so input order does not matter) and cut
    by the split fractions with largest-remainder rounding.

    Args:
        patients: ``[N]`` pseudonyms.
        labels: ``[N]`` int class indices.
        num_classes: number of classes.
        cfg: the data config (``split_train``, ``split_val``, ``split_test``).
        seed: the run seed.

    Returns:
        ``[N]`` split names (str).
    """
    fractions = np.array([cfg.split_train, cfg.split_val, cfg.split_test], dtype=np.float64)
    if (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
        raise PreprocessError(f"data.split_train/val/test must be >= 0 and sum to 1, got {fractions.tolist()}")
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for p, y in zip(patients, labels):
        per_patient[str(p)][int(y)] += 1
    strata: dict[int, list[str]] = defaultdict(list)
    for p in sorted(per_patient):
        counts = per_patient[p]
        majority = min(counts, key=lambda y: (-counts[y], y))
        strata[majority].append(p)

    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for y in range(num_classes):
        group = strata.get(y, [])
        if not group:
            continue
        order = rng.permutation(len(group))
        sizes = _largest_remainder(len(group), fractions)
        start = 0
        for split, size in zip(SPLITS, sizes):
            for i in order[start : start + size]:
                assignment[group[i]] = split
            start += size
    return np.array([assignment[str(p)] for p in patients], dtype=object).astype(str)


def _largest_remainder(n: int, fractions: np.ndarray) -> list[int]:
    raw = fractions * n
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    return sizes.tolist()


def load_ingest(ingest_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Read ``images.npy``, ``manifest.csv`` and ``ingest.json`` written by the ingest step.

    Returns:
        ``(images uint8 [N, C, R, R], patients [N] str, labels [N] str, summary dict)``.
    """
    root = Path(ingest_dir)
    needed = ("images.npy", "manifest.csv", "ingest.json")
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise PreprocessError(f"{root}: no {missing[0]}; run `radsynth ingest` first")
    summary = json.loads((root / "ingest.json").read_text())
    images = np.load(root / "images.npy", mmap_mode="r")
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != images.shape[0]:
        raise PreprocessError(f"{root}: manifest has {len(rows)} rows but images.npy holds {images.shape[0]}; re-run ingest")
    patients = np.array([r["patient"] for r in rows], dtype=str)
    labels = np.array([r["label"] for r in rows], dtype=str)
    return images, patients, labels, summary


def preprocess(params: Params, ingest_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> PreprocessResult:
    """Build ``<artifacts>/dataset`` from ``<artifacts>/ingest``.

    Args:
        params: resolved config (``data`` section, ``seed``, ``paths.artifacts``).
        ingest_dir: ingest output (default ``<paths.artifacts>/ingest``).
        out_dir: dataset directory (default ``<paths.artifacts>/dataset``).

    Returns:
        The :class:`PreprocessResult` (also written as ``preprocess.json`` in the dataset).
    """
    cfg = params.data
    ingest_dir = Path(ingest_dir or Path(params.paths.artifacts) / INGEST_STEP)
    out_dir = Path(out_dir or Path(params.paths.artifacts) / "dataset")
    images, patients, label_names, summary = load_ingest(ingest_dir)
    n, c, r, _ = images.shape
    if n == 0:
        raise PreprocessError(f"{ingest_dir}: ingest kept no images; see its quarantine.json")
    if r != cfg.img_resolution or c != cfg.img_channels:
        raise PreprocessError(
            f"{ingest_dir}: images are {c}x{r}x{r} but params ask for {cfg.img_channels}x{cfg.img_resolution}x{cfg.img_resolution}; re-run ingest"
        )
    classes = list(cfg.classes) or list(summary.get("classes") or sorted(set(label_names)))
    unknown = sorted(set(label_names) - set(classes))
    if unknown:
        raise PreprocessError(f"{ingest_dir}: labels {unknown} are not in the class list {classes}; re-run ingest with these params")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[y] for y in label_names], dtype=np.int64)
    splits = split_patients(patients, labels, len(classes), cfg, params.seed)

    full = np.ascontiguousarray(images)  # [N, C, R, R]
    augmented = 0
    if cfg.hflip:
        train = np.flatnonzero(splits == "train")
        full = np.concatenate([full, full[train][..., ::-1]])
        patients = np.concatenate([patients, patients[train]])
        labels = np.concatenate([labels, labels[train]])
        splits = np.concatenate([splits, splits[train]])
        augmented = int(train.size)

    from radsynth.imaging import downsample_levels

    levels = levels_for(cfg.img_resolution, cfg.min_resolution)
    by_level = downsample_levels(full, levels)
    split_counts = {s: int((splits == s).sum()) for s in SPLITS}
    split_pat = {s: len(set(patients[splits == s])) for s in SPLITS}
    meta = {
        "seed": params.seed,
        "data_md5": summary.get("data_md5", "unknown"),
        "augment": {"hflip": cfg.hflip, "augmented_images": augmented},
        "split_fractions": {"train": cfg.split_train, "val": cfg.split_val, "test": cfg.split_test},
        "split_patients": split_pat,
        # what ingest quarantined, for validate's dataset-level checks (counts only)
        "ingest": {"num_images": int(summary.get("num_images", n)),
                   "quality_quarantined": int(summary.get("quality_quarantined", 0)),
                   "quarantine_total": int(summary.get("quarantine_total", 0))},
    }
    save_dataset(out_dir, by_level, list(patients), labels, list(splits), classes, extra_meta=meta)
    result = PreprocessResult(
        out_dir=out_dir,
        num_images=int(full.shape[0]),
        levels=tuple(levels),
        classes=tuple(classes),
        split_counts=split_counts,
        split_patients=split_pat,
        augmented=augmented,
    )
    from radsynth.io import write_json

    params.save(out_dir / "params.yaml")
    write_json(out_dir / "preprocess.json", {"step": STEP, **{k: v for k, v in dataclasses.asdict(result).items() if k != "out_dir"}})
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ingest-dir", default=None, help="ingest output (default: <paths.artifacts>/ingest)")
    parser.add_argument("--out", default=None, help="dataset folder (default: <paths.artifacts>/dataset)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    res = preprocess(params, ingest_dir=args.ingest_dir, out_dir=args.out)
    print(
        f"preprocess: {res.num_images} images, levels {list(res.levels)}, classes {list(res.classes)} -> {res.out_dir}\n"
        + "  "
        + ", ".join(f"{s} {res.split_counts[s]} images / {res.split_patients[s]} patients" for s in SPLITS)
        + (f"\n  hflip: {res.augmented} mirrored training copies" if res.augmented else "")
    )
    return 0
