"""Feature extraction for the distances: torch-fidelity extractors, the Inception weights, the cache.

Two feature extractors, kept apart by name:

* ``*_inception``: torch-fidelity's ``inception-v3-compat`` with the standard weights file
  (``eval.inception_weights`` or ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
  When the file is absent the keys are listed as unavailable; nothing else is computed in
  their place. Grayscale images are repeated to three channels; torch-fidelity resizes to
  299x299 (TF1-compatible bilinear).
* ``*_domain``: the penultimate features of the judge (:mod:`model.classifier`), registered
  with torch-fidelity as ``radsynth-domain``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from radsynth.config import EvalConfig

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"     # the file name's hash suffix (torch hub convention: sha256 prefix)
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_LAYER = "2048"


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, channels: int | None = None):
        self.images = images
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i]))  # [C, H, W] uint8
        if self.channels and x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x


def tf_features(images: np.ndarray, extractor: str, layer: str, weights: str, batch_size: int, channels: int | None = None) -> np.ndarray:
    """Features ``[N, D]`` (float64) of uint8 images from a torch-fidelity extractor (no worker processes)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    if len(images) == 0:
        raise ValueError("no images to extract features from")
    fe = create_feature_extractor(extractor, [layer], cuda=torch.cuda.is_available(),
                                  feature_extractor_weights_path=weights, verbose=False)
    feats = get_featuresdict_from_dataset(_ImageDataset(images, channels), fe, batch_size,
                                          cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=False)
    return feats[layer].double().numpy()


def inception_weights_path(cfg: EvalConfig) -> tuple[Path | None, str]:
    """The InceptionV3 weights file, or ``None`` with the reason it is unavailable."""
    if cfg.inception_weights:
        path = Path(cfg.inception_weights)
    else:
        torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
        path = Path(torch_home) / "hub" / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        return None, (f"InceptionV3 weights not found at {path} (set eval.inception_weights or place "
                      f"{INCEPTION_FILE} under $TORCH_HOME/hub/checkpoints); nothing is downloaded at run time")
    try:  # a user-supplied file: refuse anything that is not a plain tensor state dict
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "fc.weight" not in state:
            return None, f"{path} is not the InceptionV3 state dict torch-fidelity expects"
    except Exception as exc:  # torch raises several types for a bad file
        return None, f"{path} could not be read safely ({type(exc).__name__}: {exc})"
    return path, ""


class FeatureCache:
    """Real-image features stored once per (data version, extractor, weights hash)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None

    def _path(self, identity: str, extractor: str, weights_sha: str) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{identity}|{extractor}|{weights_sha}".encode()).hexdigest()[:24]
        return self.root / f"features-{extractor}-{key}.npz"

    def get_or_compute(self, identity: str, extractor: str, weights_sha: str, compute) -> tuple[dict[str, np.ndarray], bool]:
        """Cached arrays, or ``compute()`` stored; returns ``(arrays, was_cached)``."""
        from radsynth.io import atomic_path

        path = self._path(identity, extractor, weights_sha)
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return {k: data[k] for k in data.files}, True
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        arrays = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
        return arrays, False
