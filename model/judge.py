"""The judge: the domain classifier of one data version, trained once and cached.

:func:`judge_for` returns the classifier behind every domain metric for a set of real splits:
from the cache when one was trained for the same data identity and judge config
(``eval.judge`` + ``eval.seed`` + the architecture version), else trained on the real train
split to convergence (early-stopped on real val) and stored with its report: real test
accuracy per condition and balanced, real val balanced accuracy, the epochs it took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from radsynth.config import EvalConfig


@dataclasses.dataclass(frozen=True)
class Judge:
    path: Path                           # safetensors weights (model.classifier format)
    meta: dict                           # classes, data identity, recipe, training record, report
    cached: bool                         # reused from the cache
    train_seconds: float                 # 0 when cached

    @property
    def report(self) -> dict:
        """``{"test": {"balanced": .., "accuracy": .., "per_class": {c: ..}}, "val": {...}, "training": {...}}``."""
        return self.meta.get("report", {})


def real_report(model, images: np.ndarray, labels: np.ndarray, classes) -> dict:
    """Accuracy, balanced accuracy and per-condition accuracy of ``model`` on labelled real images."""
    from model import classifier as clf

    pred = clf.predict_proba(model, images).argmax(1)
    bal, per = clf.balanced_accuracy(pred, labels, len(classes))
    return {"balanced": bal, "accuracy": float((pred == labels).mean()), "per_class": dict(zip(classes, per)),
            "images": int(len(labels))}


def judge_key(identity: str, cfg: EvalConfig) -> str:
    """Cache key: the data identity, the judge recipe, the seed and the architecture version."""
    from model.classifier import ARCH_VERSION

    blob = {"data": identity, "judge": dataclasses.asdict(cfg.judge), "seed": cfg.seed, "arch": ARCH_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def judge_for(real, cfg: EvalConfig, cache_dir: str | Path | None, progress: bool = False) -> Judge:
    """The judge for these real splits: reused from ``cache_dir`` or trained and stored there.

    Args:
        real: :class:`model.metrics.RealSplits`.
        cfg: the ``eval`` section (``judge`` recipe, ``seed``).
        cache_dir: the cache folder (``None``: the working directory).
        progress: a progress bar while training.
    """
    from model import classifier as clf
    from radsynth.errors import RadsynthError

    root = Path(cache_dir) if cache_dir else Path(".")
    path = root / f"judge-{judge_key(real.identity, cfg)}.safetensors"
    if path.is_file():
        try:
            _, meta = clf.load_classifier(path)
            return Judge(path, meta, True, 0.0)
        except RadsynthError:
            path.unlink(missing_ok=True)  # a damaged file: train again
    t0 = time.perf_counter()
    model, record = clf.train_classifier(real.train, real.train_labels, len(real.classes), cfg.judge, seed=cfg.seed,
                                         val=(real.val, real.val_labels), progress=progress)
    seconds = round(time.perf_counter() - t0, 2)
    classes = list(real.classes)
    meta = {"classes": classes, "data_identity": real.identity, "recipe": dataclasses.asdict(cfg.judge), "seed": cfg.seed,
            "arch_version": clf.ARCH_VERSION, "img_resolution": real.img_resolution,
            "report": {"test": real_report(model, real.test, real.test_labels, classes),
                       "val": real_report(model, real.val, real.val_labels, classes),
                       "training": {**dataclasses.asdict(record), "train_images": int(len(real.train_labels))}}}
    root.mkdir(parents=True, exist_ok=True)
    clf.save_classifier(path, model, meta)
    return Judge(path, meta, False, seconds)
