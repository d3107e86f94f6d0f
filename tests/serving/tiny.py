"""A tiny conditional generator exported to ONNX with exactly the project's ONNX contract.

Used by the serving tests until ``model/registry.py`` lands on main (then the tests export a
tiny real generator instead). Inputs ``z`` [N, z_dim] float32 and ``class`` [N] int64, output
``image`` [N, C, H, W] float32 in [-1, 1], dynamic batch, ``metadata_props`` with
``classes`` (JSON), ``z_dim``, ``img_resolution``, ``img_channels``, ``variant``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

CLASSES = ["NORMAL", "PNEUMONIA", "COVID"]
OPSET = 17


class TinyG(nn.Module):
    """z + class embedding -> 4x4 features -> two upsampling convs -> tanh."""

    def __init__(self, z_dim: int = 8, num_classes: int = 3, img_resolution: int = 16, img_channels: int = 1):
        super().__init__()
        self.z_dim = z_dim                         # latent size
        self.num_classes = num_classes             # conditions
        self.img_resolution = img_resolution       # output side
        self.img_channels = img_channels           # 1: grey
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, 16 * 4 * 4)
        layers: list[nn.Module] = []
        res = 4
        while res < img_resolution:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 16, 3, padding=1), nn.LeakyReLU(0.2)]
            res *= 2
        self.body = nn.Sequential(*layers)
        self.to_img = nn.Conv2d(16, img_channels, 1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.embed(c)], dim=1)               # [N, 2 * z_dim]
        x = self.fc(x).view(-1, 16, 4, 4)                      # [N, 16, 4, 4]
        return torch.tanh(self.to_img(self.body(x)))           # [N, C, R, R]


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


def make_tiny(path: Path, seed: int = 0, z_dim: int = 8, img_resolution: int = 16, img_channels: int = 1) -> tuple[nn.Module, Path]:
    """A seeded tiny generator and its ONNX file."""
    torch.manual_seed(seed)
    G = TinyG(z_dim, len(CLASSES), img_resolution, img_channels).eval()
    return G, export_onnx(G, path, CLASSES)
