"""A tiny real generator (``model.registry.build_networks``, tiny profile) exported by the
project's exporter (``components.export.export_generator``): inputs ``z`` [N, z_dim] float32
and ``class`` [N] int64, output ``image`` [N, C, H, W] float32 in [-1, 1], dynamic batch,
``metadata_props`` with ``classes``, ``z_dim``, ``img_resolution``, ``img_channels``, ``variant``.
Untrained weights: serving only needs a deterministic function of (z, class).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from radsynth.config import Params

CLASSES = ["NORMAL", "PNEUMONIA", "COVID"]


def make_generator(path: Path, params: Params, img_resolution: int = 16, seed: int = 0,
                   classes: list[str] = CLASSES) -> tuple[nn.Module, Path]:
    """A seeded generator of ``params.model`` (grey) exported to ``path``; returns ``(G, path)``."""
    from components.export import export_generator
    from model.registry import build_networks
    from radsynth.io import write_json

    G, _ = build_networks(params.model, len(classes), 1, img_resolution, seed=seed)
    G.eval().requires_grad_(False)
    meta = {"classes": list(classes), "variant": params.model.variant, "data_md5": "test", "params_digest": params.digest()}
    record = export_generator(G, meta, path, params.export)
    write_json(Path(path).with_name("export.json"), record)
    return G, Path(path)
