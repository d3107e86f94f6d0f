"""The domain classifier: a small CNN trained on the real training split.

It is the judge of the evaluation: its penultimate features are the "domain" feature space of
``fid_domain`` / ``kid_domain`` / precision / recall / feature-space memorisation (registered
with torch-fidelity as a feature extractor), its softmax gives the condition accuracy and
confidence of generated images, and the same recipe trained on generated images gives
train-synthetic-test-real (TSTR). It trains at the dataset's full resolution with light
augmentation (shifts, zoom, contrast; no flips) to convergence, early-stopped on the real
validation split (:func:`train_classifier`). It is exported to ONNX (input
``image`` [N, C, H, W] float32 in [-1, 1], output ``logits`` [N, num_classes]) and registered
as ``radsynth-classifier`` so the web page can show a confidence next to each image.

Weights are stored with safetensors; the architecture travels in the file's metadata, so
loading never unpickles anything.
"""

from __future__ import annotations

import copy
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
ARCH_VERSION = 2                         # bump when the network or its training changes (invalidates caches)
MIN_STEPS_PER_EPOCH = 20                 # a training set smaller than 20 batches is passed over more than once per epoch
_META_KEY = "radsynth_classifier"


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What is needed to rebuild the network (stored in the weights file)."""

    num_classes: int                     # output logits
    img_channels: int                    # input channels
    img_resolution: int                  # input height = width, power of two >= 8
    width: int = 32                      # channels after the stem; doubles per halving, capped at 4x
    depth: int = 2                       # conv layers per resolution level (the first strided)


def _norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


class DomainClassifier(nn.Module):
    """A small CNN that sees every pixel: a strided 4x4 stem, then conv levels down to 4x4.

    Nothing is downscaled before the network: the stem is a learned stride-2 convolution over
    the full-resolution input, so blur, checkerboards and fine texture stay visible to it.
    Each level halves the resolution with a strided 3x3 conv and adds ``depth - 1`` more 3x3
    convs (batch norm, leaky ReLU); global average pooling gives the features.

    ``features(x)`` returns the pooled penultimate activations ``[N, feature_dim]``;
    ``forward(x)`` returns the logits ``[N, num_classes]``. Input: float32 in [-1, 1].
    """

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        res = spec.img_resolution
        if res < 8 or res & (res - 1):
            raise RadsynthError(f"classifier resolution must be a power of two >= 8, got {res}")
        self.spec = spec
        layers: list[nn.Module] = [nn.Conv2d(spec.img_channels, spec.width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch, res = spec.width, res // 2
        while res > 4:
            out = min(ch * 2, spec.width * 4)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), _norm(out), nn.LeakyReLU(0.2)]
            for _ in range(spec.depth - 1):
                layers += [nn.Conv2d(out, out, 3, padding=1), _norm(out), nn.LeakyReLU(0.2)]
            ch, res = out, res // 2
        layers += [nn.Conv2d(ch, ch, 3, padding=1), _norm(ch), nn.LeakyReLU(0.2)]
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


def augment(x: torch.Tensor, gen: torch.Generator, shift: float, scale: float, contrast: float) -> torch.Tensor:
    """Light augmentation of a batch ``[N, C, H, W]`` in [-1, 1]: small shifts and zoom, contrast and
    brightness; never flips (the heart is on the left). Border pixels are repeated at the edges."""
    n = x.shape[0]
    if shift > 0 or scale > 0:
        zoom = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
        move = (torch.rand(n, 2, generator=gen) * 2 - 1) * shift * 2  # fraction of the side -> [-1, 1] grid units
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = zoom
        theta[:, :, 2] = move
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if contrast > 0:
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * contrast
        offset = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * contrast / 2
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + offset).clamp(-1, 1)
    return x


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Mean of the per-class recalls over the classes present, and the per-class recalls (NaN when absent)."""
    per = [float((pred[labels == i] == i).mean()) if (labels == i).any() else float("nan") for i in range(num_classes)]
    present = [a for a in per if np.isfinite(a)]
    return (float(np.mean(present)) if present else float("nan")), per


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """How a classifier's training went (stored beside the judge's weights)."""

    epochs: int                          # epochs run
    best_epoch: int                      # epoch whose weights were kept (1-based)
    val_balanced_acc: float              # at the best epoch (NaN when no validation set was given)
    stopped_early: bool                  # stopped by patience before max_epochs
    steps: int                           # optimiser steps
    seconds: float                       # wall time


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe,
    seed: int = 0,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[DomainClassifier, TrainingRecord]:
    """Train the classifier recipe to convergence, early-stopped on a real validation split.

    Deterministic for a seed on CPU (same thread count): initialisation, order, augmentation.

    Args:
        images: uint8 ``[N, C, H, W]`` (or float in [-1, 1]).
        labels: int ``[N]`` class indices.
        num_classes: number of classes.
        recipe: a :class:`radsynth.config.JudgeConfig` (width, depth, epochs, patience, lr,
            batch, augmentation).
        seed: seeds initialisation, shuffling and augmentation.
        val: ``(images, labels)`` of the real validation split; the weights of the epoch with
            the best balanced accuracy on it are kept, the learning rate halves after
            ``patience // 2`` epochs without progress and training stops after ``patience``.
            ``None``: ``max_epochs`` epochs, last weights.
        progress: show a tqdm bar (one tick per epoch).

    Returns:
        ``(classifier in eval mode, TrainingRecord)``.
    """
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise RadsynthError(f"classifier training needs images [N, C, H, W] with N labels, got {images.shape} and {labels.shape}")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DomainClassifier(ClassifierSpec(num_classes, images.shape[1], images.shape[2], recipe.width, recipe.depth))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    x_all = _as_float(images)  # [N, C, H, W]
    y_all = torch.as_tensor(labels)
    # Class-balanced loss weights: the sample's classes are unbalanced (2:1).
    counts = torch.bincount(y_all, minlength=num_classes).float().clamp(min=1)
    weight = counts.sum() / (num_classes * counts)
    n = x_all.shape[0]
    batch = max(2, min(recipe.batch, n))
    steps_per_epoch = max(MIN_STEPS_PER_EPOCH, -(-n // batch))
    # The weights judged and kept are an exponential moving average of the trained ones (smoother
    # from epoch to epoch, so early stopping picks a less accidental epoch); buffers are copied.
    # The decay warms up as min(ema, (1 + t) / (10 + t)), so short runs on small sets move too.
    ema = copy.deepcopy(model).requires_grad_(False) if recipe.ema > 0 else model
    best, best_state, best_epoch, stale, steps, epoch = -1.0, None, 0, 0, 0, 0
    order, pos = torch.randperm(n, generator=gen), 0
    bar = tqdm(total=recipe.max_epochs, desc="classifier", unit="epoch", disable=not progress, leave=False)
    for epoch in range(1, recipe.max_epochs + 1):
        model.train()
        for _ in range(steps_per_epoch):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch]
            pos += batch
            xb = augment(x_all[idx], gen, recipe.shift, recipe.scale, recipe.contrast)
            loss = F.cross_entropy(model(xb), y_all[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if ema is not model:
                decay = min(recipe.ema, (1 + steps) / (10 + steps))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(p, 1.0 - decay)
                    for be, b in zip(ema.buffers(), model.buffers()):
                        be.copy_(b)
        bar.update()
        if val is None:
            continue
        score = balanced_accuracy(predict_proba(ema, val[0]).argmax(1), np.asarray(val[1]), num_classes)[0]
        bar.set_postfix(val_bal_acc=f"{score:.3f}")
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        else:
            stale += 1
            if stale == max(1, recipe.patience // 2):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
            if stale >= recipe.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        if ema is not model:
            model.load_state_dict(ema.state_dict())
        best_epoch, best = epoch, float("nan")
    record = TrainingRecord(epochs=epoch, best_epoch=best_epoch, val_balanced_acc=float(best),
                            stopped_early=epoch < recipe.max_epochs, steps=steps, seconds=round(time.perf_counter() - t0, 2))
    return model.eval(), record


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
