"""Evaluation pictures: per-condition sample grid, the judge's confusion on generated images,
and the generated images closest to a training image beside it (what memorisation would look like).

PNG bytes (PIL, and matplotlib's Agg backend for the matrix) and one self-contained HTML page
that embeds them, so a Kubeflow run page or an MLflow run shows them without any server.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import numpy as np


def _to_pil(images: np.ndarray):
    from PIL import Image

    arr = images[0] if images.shape[0] == 1 else images.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(arr))


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tile(rows: list[list[np.ndarray]], labels: Sequence[str], pad: int = 2, label_width: int = 150) -> bytes:
    """Rows of uint8 [C, R, R] tiles with a text label in front of each row -> PNG bytes."""
    from PIL import Image, ImageDraw

    res = max(t.shape[-1] for row in rows for t in row) if any(rows) else 16
    scale = max(1, 64 // res)
    side = res * scale
    cols = max((len(r) for r in rows), default=1)
    canvas = Image.new("L", (label_width + cols * (side + pad) + pad, len(rows) * (side + pad) + pad), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        y = pad + r * (side + pad)
        draw.text((4, y + side // 2 - 6), label[:24], fill=0)
        for c, tile in enumerate(row):
            img = _to_pil(tile).convert("L").resize((side, side), resample=0)
            canvas.paste(img, (label_width + pad + c * (side + pad), y))
    return _png(canvas)


def sample_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], per_class: int = 8) -> bytes:
    """The first ``per_class`` generated images of every condition, one row each."""
    rows = [list(images[labels == i][:per_class]) for i in range(len(classes))]
    return _tile(rows, list(classes))


def nearest_pairs(generated: np.ndarray, train: np.ndarray, nearest_idx: np.ndarray, distance: np.ndarray,
                  n: int = 8) -> tuple[bytes, list[float]]:
    """The ``n`` generated images closest to a training image (top row) above that training image
    (bottom row), and their distances (per-pixel RMS), closest first."""
    order = np.argsort(distance, kind="stable")[:n]
    png = _tile([list(generated[order]), list(train[nearest_idx[order]])], ["generated", "nearest training"])
    return png, [float(d) for d in distance[order]]


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str = "judge on generated images") -> bytes:
    """The confusion matrix (rows: requested condition, columns: the judge's prediction), row-normalised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    share = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(classes), 1.2 + 1.1 * len(classes)), dpi=100)
    ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), [c.replace("_", "\n") for c in classes], fontsize=8)
    ax.set_yticks(range(len(classes)), [c.replace("_", "\n") for c in classes], fontsize=8)
    ax.set_xlabel("judge's prediction")
    ax.set_ylabel("requested condition")
    ax.set_title(title, fontsize=9)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{share[i, j]:.2f}\n({int(m[i, j])})", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report_html(title: str, summary: str, pictures: dict[str, bytes], tables: str = "") -> str:
    """A self-contained HTML page: a title, a one-line summary, pictures (caption -> PNG bytes), a table."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;max-width:70em}img{image-rendering:pixelated;"
             "border:1px solid #ccc;max-width:100%}figure{margin:1em 0}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>"]
    for caption, png in pictures.items():
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img src='{uri}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += [tables, "</body></html>"]
    return "\n".join(parts)
