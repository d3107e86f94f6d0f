"""Sampling helpers: seeded images from a generator, and per-condition grids (written by :func:`radsynth.grid.save_grid_png`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from radsynth.dataset import to_uint8
from radsynth.latent import z_from_seed


@torch.no_grad()
def generate(G: nn.Module, classes: Sequence[int] | torch.Tensor, seed: int, batch: int = 64) -> torch.Tensor:
    """Images for ``classes`` with z from :func:`radsynth.latent.z_from_seed` (``seed``).

    Returns:
        float32 [N, C, R, R] in [-1, 1] on the CPU.
    """
    device = next(G.parameters()).device
    c = torch.as_tensor(classes, dtype=torch.int64)
    z = torch.from_numpy(z_from_seed(seed, len(c), G.z_dim))
    out = [G(z[i:i + batch].to(device), c[i:i + batch].to(device)).float().cpu() for i in range(0, len(c), batch)]
    return torch.cat(out) if out else torch.empty(0, G.img_channels, G.resolution, G.resolution)


@torch.no_grad()
def class_grid(G: nn.Module, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """One row per condition, the same ``per_class`` latents in every row.

    Returns:
        uint8 [num_classes * R, per_class * R, C] (a grid image, 1 px gaps not drawn).
    """
    device = next(G.parameters()).device
    z = torch.from_numpy(z_from_seed(seed, per_class, G.z_dim)).to(device)            # [P, z_dim]
    rows = []
    for k in range(num_classes):
        c = torch.full((per_class,), k, dtype=torch.int64, device=device)
        imgs = to_uint8(G(z, c).float().cpu().numpy())                                # [P, C, R, R]
        rows.append(np.concatenate(list(imgs.transpose(0, 2, 3, 1)), axis=1))        # [R, P*R, C]
    return np.concatenate(rows, axis=0)
