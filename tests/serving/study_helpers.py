"""Building blocks of the reader-study tests: a prepared dataset whose every image is
recognisable, an in-process generator, and scripted readers.

The dataset's images are seeded noise, one seed per dataset row, so an image in a study can
be traced back to exactly one row (and so to its split) by its pixels.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from radsynth.config import Params
from serving.study import ModelRef
from serving.study_store import CALLS, CANNOT_TELL, Study
from tests.serving.tiny import CLASSES

SPLIT_PER_CLASS = {"train": 8, "val": 3, "test": 4}


def make_dataset(root: Path, classes=tuple(CLASSES), res: int = 16, per_class=SPLIT_PER_CLASS):
    """A prepared dataset (radsynth.dataset format) of seeded-noise images; returns it loaded."""
    from radsynth.dataset import save_dataset

    labels, splits = [], []
    for split, n in per_class.items():
        for k in range(len(classes)):
            labels += [k] * n
            splits += [split] * n
    n = len(labels)
    full = np.stack([np.random.default_rng(1000 + i).integers(0, 256, (1, res, res), dtype=np.uint8) for i in range(n)])
    half = full.reshape(n, 1, res // 2, 2, res // 2, 2).mean(axis=(3, 5)).astype(np.uint8)
    return save_dataset(root, {res // 2: half, res: full}, [f"p{i:03d}" for i in range(n)], labels, splits, list(classes))


class TorchSource:
    """The served generator's interface, answered by a real tiny PyTorch generator in process."""

    def __init__(self, G, max_batch: int = 4):
        self.G = G
        self.max_batch = max_batch
        self.calls: list[int] = []

    @torch.no_grad()
    def generate(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        assert len(z) <= self.max_batch
        self.calls.append(len(z))
        return self.G(torch.from_numpy(z), torch.from_numpy(labels)).numpy()


def tiny_model(params: Params, version: int = 7, seed: int = 0):
    """``(G, ModelRef)`` of a seeded tiny generator (3 classes, 16x16 grey)."""
    from model.registry import build_networks

    torch.set_num_threads(1)
    G, _ = build_networks(params.model, len(CLASSES), 1, 16, seed=seed)
    G.eval().requires_grad_(False)
    ref = ModelRef(name="radsynth-generator", version=version, alias="champion", onnx_sha256="0" * 64, gate="passed",
                   run_id="", classes=tuple(CLASSES), z_dim=int(G.z_dim), img_resolution=16, img_channels=1)
    return G, ref


# --------------------------------------------------------------------------------------
# Scripted readers: each maps (the item's answer key, position) -> (call, confidence, condition)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ScriptedAnswer:
    call: str
    confidence: int
    condition: str


def always_right(item: dict, position: int) -> ScriptedAnswer:
    return ScriptedAnswer(item["kind"], 5, item["condition"])


def always_real(item: dict, position: int) -> ScriptedAnswer:
    return ScriptedAnswer("real", 3, CLASSES[0])


def random_reader(seed: int = 7):
    rng = random.Random(seed)
    choices = list(CLASSES) + [CANNOT_TELL]

    def answer(item: dict, position: int) -> ScriptedAnswer:
        return ScriptedAnswer(rng.choice(CALLS), rng.randint(1, 5), rng.choice(choices))
    return answer


def script(study: Study, readers) -> dict[int, list[tuple[dict, ScriptedAnswer]]]:
    """Every reader's answers in their own order: ``{reader: [(item, answer), ...]}``."""
    items = {item["item"]: item for item in study.manifest["items"]}
    out = {}
    for reader, fn in enumerate(readers, start=1):
        out[reader] = [(items[i], fn(items[i], p)) for p, i in enumerate(study.order(reader))]
    return out
