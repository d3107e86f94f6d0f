"""A tiny real generator (``model.registry.build_networks``, tiny profile) exported to ONNX
with exactly the project's ONNX contract: inputs ``z`` [N, z_dim] float32 and ``class`` [N]
int64, output ``image`` [N, C, H, W] float32 in [-1, 1], dynamic batch, ``metadata_props``
with ``classes`` (JSON), ``z_dim``, ``img_resolution``, ``img_channels``, ``variant``.
Untrained weights: serving only needs a deterministic function of (z, class).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from radsynth.config import Params

CLASSES = ["NORMAL", "PNEUMONIA", "COVID"]
OPSET = 17


def export_onnx(G: nn.Module, path: Path, classes: list[str], variant: str = "tiny") -> Path:
    """Export ``G`` with the contract's tensor names, dynamic batch and metadata."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    z = torch.zeros(2, G.z_dim)
    c = torch.zeros(2, dtype=torch.int64)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and quick for a tiny model
        warnings.simplefilter("ignore")
        torch.onnx.export(
            G.eval(), (z, c), str(path), input_names=["z", "class"], output_names=["image"],
            dynamic_axes={"z": {0: "N"}, "class": {0: "N"}, "image": {0: "N"}}, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load(str(path))
    meta = {
        "classes": json.dumps(classes), "z_dim": str(G.z_dim), "img_resolution": str(G.img_resolution),
        "img_channels": str(G.img_channels), "variant": variant,
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def make_generator(path: Path, params: Params, img_resolution: int = 16, seed: int = 0) -> tuple[nn.Module, Path]:
    """A seeded generator of ``params.model`` (grey, 3 classes) and its ONNX file."""
    from model.registry import build_networks

    G, _ = build_networks(params.model, len(CLASSES), 1, img_resolution, seed=seed)
    G.eval().requires_grad_(False)
    return G, export_onnx(G, path, CLASSES, variant=params.model.variant)
