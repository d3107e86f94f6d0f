"""Image grids as PNG: the training stages' sample grids and the model card's grid (torch-free)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from radsynth.io import atomic_path


def save_grid_png(path: str | os.PathLike, grid: np.ndarray, row_labels: Sequence[str] = ()) -> Path:
    """Write a grid (uint8 [H, W, C]) as PNG, with optional row labels on the left."""
    from PIL import Image, ImageDraw

    if grid.shape[2] == 1:
        img = Image.fromarray(grid[:, :, 0], mode="L")
    else:
        img = Image.fromarray(grid[:, :, :3])
    scale = max(1, 256 // max(1, grid.shape[0] // max(1, len(row_labels) or 1)))
    img = img.resize((img.width * min(scale, 8), img.height * min(scale, 8)), Image.NEAREST)
    if row_labels:
        pad = 8 + 7 * max(len(s) for s in row_labels)
        canvas = Image.new(img.mode, (img.width + pad, img.height), 0 if img.mode == "L" else (0, 0, 0))
        canvas.paste(img, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = img.height / len(row_labels)
        for i, label in enumerate(row_labels):
            draw.text((4, int(i * row_h + row_h / 2 - 5)), label, fill=255 if img.mode == "L" else (255, 255, 255))
        img = canvas
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
