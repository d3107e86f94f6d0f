"""The domain classifier: a small CNN trained on the real training split.

It serves four purposes in the evaluation: its penultimate features are the "domain"
feature space of ``fid_domain`` / ``kid_domain`` / precision / recall / feature-space
memorisation (registered with torch-fidelity as a feature extractor), its softmax gives the
condition accuracy and confidence of generated images, and the same recipe trained on
generated images gives train-synthetic-test-real (TSTR). It is exported to ONNX (input
``image`` [N, C, H, W] float32 in [-1, 1], output ``logits`` [N, num_classes]) and registered
as ``radsynth-classifier`` so the web page can show a confidence next to each image.

Weights are stored with safetensors; the architecture travels in the file's metadata, so
loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radsynth.errors import RadsynthError

DOMAIN_EXTRACTOR = "radsynth-domain"     # torch-fidelity feature extractor name
FEATURE_LAYER = "penultimate"            # features used by FID/KID/PRC
_META_KEY = "radsynth_classifier"


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What is needed to rebuild the network (stored in the weights file)."""

    num_classes: int                     # output logits
    img_channels: int                    # input channels
    img_resolution: int                  # input height = width, power of two >= 4
    width: int = 32                      # channels of the first conv; doubles per level, capped at 4x
    work_resolution: int = 32            # inputs above this are average-pooled down to it first (CPU cost)


class DomainClassifier(nn.Module):
    """Conv blocks that halve the resolution down to 4x4, global average pool, linear head.

    Inputs larger than ``spec.work_resolution`` are average-pooled to it first: the
    features need the conditions' structure, not every pixel, and this keeps CPU training short.

    ``features(x)`` returns the pooled penultimate activations ``[N, feature_dim]``;
    ``forward(x)`` returns the logits ``[N, num_classes]``. Input: float32 in [-1, 1].
    """

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        res = spec.img_resolution
        if res < 4 or res & (res - 1):
            raise RadsynthError(f"classifier resolution must be a power of two >= 4, got {res}")
        self.spec = spec
        work = min(res, max(4, spec.work_resolution))
        layers: list[nn.Module] = [nn.AvgPool2d(res // work)] if work < res else []
        layers += [nn.Conv2d(spec.img_channels, spec.width, 3, padding=1), nn.LeakyReLU(0.2)]
        ch, res = spec.width, work
        while res > 4:
            out = min(ch * 2, spec.width * 4)
            layers += [nn.AvgPool2d(2), nn.Conv2d(ch, out, 3, padding=1), nn.GroupNorm(min(8, out), out), nn.LeakyReLU(0.2)]
            ch, res = out, res // 2
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = ch
        self.head = nn.Linear(ch, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` of float images ``[N, C, H, W]`` in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))  # [N, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [N, num_classes]


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] -> float32 tensor in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if t.dtype == torch.uint8:
        return t.float() / 127.5 - 1.0
    return t.float()


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    steps: int = 400,
    width: int = 32,
    work_resolution: int = 32,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> DomainClassifier:
    """Train the classifier recipe on images with labels (deterministic for a seed on CPU).

    Args:
        images: uint8 ``[N, C, H, W]`` (or float in [-1, 1]).
        labels: int ``[N]`` class indices.
        num_classes: number of classes.
        steps: optimiser steps (minibatches drawn by reshuffled passes over the data).
        width: first-conv channels.
        work_resolution: inputs are average-pooled down to this resolution first.
        lr: Adam learning rate.
        batch_size: minibatch size.
        seed: seeds initialisation and shuffling.
        progress: show a tqdm bar.

    Returns:
        The trained classifier in eval mode.
    """
    from tqdm import tqdm

    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise RadsynthError(f"classifier training needs images [N, C, H, W] with N labels, got {images.shape} and {labels.shape}")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DomainClassifier(ClassifierSpec(num_classes, images.shape[1], images.shape[2], width, work_resolution))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = _as_float(images)  # [N, C, H, W]
    y_all = torch.as_tensor(labels)
    # Class-balanced loss weights: the sample's classes are unbalanced (2:1).
    counts = torch.bincount(y_all, minlength=num_classes).float().clamp(min=1)
    weight = counts.sum() / (num_classes * counts)
    model.train()
    n = x_all.shape[0]
    batch_size = max(2, min(batch_size, n))
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in tqdm(range(steps), desc="classifier", unit="step", disable=not progress, leave=False):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx], weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: DomainClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities ``[N, num_classes]`` of uint8 or [-1, 1] float images."""
    model.eval()
    out = [F.softmax(model(_as_float(images[i:i + batch_size])), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.spec.num_classes), np.float32)


@torch.no_grad()
def extract_features(model: DomainClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Penultimate features ``[N, feature_dim]`` of uint8 or [-1, 1] float images."""
    model.eval()
    out = [model.features(_as_float(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.feature_dim), np.float32)


def accuracy(model: DomainClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on labelled images."""
    if len(images) == 0:
        return float("nan")
    return float((predict_proba(model, images).argmax(1) == np.asarray(labels)).mean())


def save_classifier(path: str | os.PathLike, model: DomainClassifier, meta: dict | None = None) -> Path:
    """Write weights + architecture + ``meta`` (classes, data identity, ...) as safetensors (atomic)."""
    from safetensors.torch import save_file

    from radsynth.io import atomic_path

    info = {"spec": dataclasses.asdict(model.spec), **(meta or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(info, sort_keys=True)})
    return Path(path)


def load_classifier(path: str | os.PathLike) -> tuple[DomainClassifier, dict]:
    """Load a classifier written by :func:`save_classifier` (no pickle).

    Returns:
        ``(model in eval mode, meta)``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RadsynthError(f"{path}: classifier weights not found; run `radsynth evaluate` to train it")
    try:
        with safe_open(str(path), framework="pt") as fh:
            info = json.loads((fh.metadata() or {})[_META_KEY])
        state = load_file(str(path))
    except (KeyError, ValueError, OSError) as exc:
        raise RadsynthError(f"{path}: not a radsynth classifier file ({exc}); delete it to retrain") from None
    model = DomainClassifier(ClassifierSpec(**info.pop("spec")))
    model.load_state_dict(state)
    return model.eval(), info


def export_classifier_onnx(model: DomainClassifier, path: str | os.PathLike, classes: Sequence[str], opset: int = 17) -> Path:
    """Export to ONNX: input ``image`` [N, C, H, W] float32 in [-1, 1], output ``logits``; dynamic batch."""
    import onnx

    from radsynth.io import atomic_path

    spec = model.spec
    dummy = torch.zeros(2, spec.img_channels, spec.img_resolution, spec.img_resolution)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model.eval(), (dummy,), str(tmp), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=opset, dynamo=False,
        )
        proto = onnx.load(str(tmp))
        for key, value in (("classes", json.dumps(list(classes))), ("img_resolution", str(spec.img_resolution)),
                           ("img_channels", str(spec.img_channels)), ("kind", "radsynth-classifier")):
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return Path(path)


# --------------------------------------------------------------------------------------
# torch-fidelity feature extractor
# --------------------------------------------------------------------------------------

try:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
except ImportError:  # pragma: no cover - torch-fidelity is a pinned dependency
    FeatureExtractorBase = nn.Module  # type: ignore[misc,assignment]


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over the domain classifier (uint8 [N, C, H, W] in).

    torch-fidelity constructs it with ``feature_extractor_weights_path`` pointing at the
    classifier's safetensors file.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise RadsynthError("the domain feature extractor needs feature_extractor_weights_path (the classifier file)")
        self.classifier, _ = load_classifier(feature_extractor_weights_path)
        self.classifier.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return (FEATURE_LAYER, "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        x = _as_float(x)  # [N, C, H, W] in [-1, 1]
        feats = self.classifier.features(x)  # [N, F]
        out = {FEATURE_LAYER: feats, "logits": self.classifier.head(feats)}
        return tuple(out[name] for name in self.features_list)


def register_domain_extractor() -> str:
    """Register :class:`DomainFeatureExtractor` with torch-fidelity once; return its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)
    return DOMAIN_EXTRACTOR
