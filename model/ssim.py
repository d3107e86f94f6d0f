"""The one SSIM / MS-SSIM definition of the project (evaluation, encoder report, web page).

NumPy only (no torch import), so the web app can use it as cheaply as the evaluation does.

* Images: uint8 ``[0, 255]`` or float ``[-1, 1]``, shaped ``[N, C, H, W]`` (or one ``[C, H, W]``).
  Both are mapped to ``[-1, 1]`` with data range 2; SSIM is unchanged by that affine map, so
  a uint8 pair and the same pair in ``[-1, 1]`` give the same number.
* Gaussian window (Wang et al. 2004): side 11 with sigma 1.5 from 64 px, side 7 from 16 px,
  side 3 below (sigma scaled with the side, ``1.5 * side / 11``), "valid" filtering (no
  padding), constants ``K1 = 0.01``, ``K2 = 0.03``, population (not sample) covariances;
  the mean is over the valid region and the channels. This equals scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=2)`` at side 11 up to its border handling.
* MS-SSIM needs the coarsest scale to be at least one window wide; at this project's small
  sizes the number of scales is reduced rather than the images upsampled (3 scales at 64, 4 at
  128, 5 from 256; 2 at 8-32). The weights of Wang et al. (2003) are truncated to the scales used
  and renormalised. :func:`ms_ssim_plan` states the choice and ``protocol["ms_ssim"]`` records it.
"""

from __future__ import annotations

import math

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2, DATA_RANGE = 0.01, 0.03, 2.0


def window_for(res: int) -> int:
    """Side of the Gaussian window for images of side ``res``."""
    return 11 if res >= 64 else 7 if res >= 16 else 3


def ms_ssim_plan(res: int) -> tuple[int, int]:
    """``(window, scales)`` for images of side ``res`` (see the module docstring)."""
    win = window_for(res)
    scales = max(1, min(len(MS_SSIM_WEIGHTS), int(math.floor(math.log2(res / win))) + 1))
    return win, scales


def _as_float(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] -> float64 [N, C, H, W] in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"SSIM needs images [N, C, H, W] or [C, H, W], got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 127.5 - 1.0
    return x.astype(np.float64)


def _gauss(win: int) -> np.ndarray:
    sigma = 1.5 * win / 11
    t = np.arange(win, dtype=np.float64) - (win - 1) / 2
    g = np.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()  # [win]


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable valid Gaussian filtering over the last two axes: [..., H, W] -> [..., H-w+1, W-w+1]."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = sliding_window_view(x, len(g), axis=-1) @ g    # [..., H, W']
    return sliding_window_view(x, len(g), axis=-2) @ g  # [..., H', W']


def _parts(x: np.ndarray, y: np.ndarray, win: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean SSIM and mean contrast-structure term of float64 [N, C, H, W] in [-1, 1]."""
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    g = _gauss(win)
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx ** 2
    syy = _filter(y * y, g) - my ** 2
    sxy = _filter(x * y, g) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    s = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs
    return s.mean(axis=(1, 2, 3)), cs.mean(axis=(1, 2, 3))  # [N], [N]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float(x), _as_float(y)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs two image sets of the same shape, got {list(x.shape)} and {list(y.shape)}")
    return x, y


def ssim(x, y, win: int | None = None) -> np.ndarray:
    """SSIM per image pair ``[N]`` (window side from :func:`window_for` unless given)."""
    x, y = _pair(x, y)
    side = min(x.shape[-2:])
    win = min(win or window_for(side), side)
    return _parts(x, y, win)[0]


def ssim_pair(a, b) -> float:
    """SSIM of one pair of ``[C, H, W]`` images (the web page's and the encoder report's number)."""
    return float(ssim(a, b)[0])


def ms_ssim(x, y) -> np.ndarray:
    """MS-SSIM per image pair ``[N]`` (scales per :func:`ms_ssim_plan`)."""
    x, y = _pair(x, y)
    win, scales = ms_ssim_plan(min(x.shape[-2:]))
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    weights = weights / weights.sum()
    out = np.ones(x.shape[0], dtype=np.float64)
    for i in range(scales):
        s, cs = _parts(x, y, win)
        out = out * np.clip(s if i == scales - 1 else cs, 0, None) ** weights[i]
        if i < scales - 1:
            x, y = _pool2(x), _pool2(y)
    return out


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling (an odd last row/column is dropped)."""
    n, c, h, w = x.shape
    x = x[:, :, : h - h % 2, : w - w % 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


__all__ = ["ssim", "ssim_pair", "ms_ssim", "ms_ssim_plan", "window_for", "MS_SSIM_WEIGHTS"]
