"""The one documented way to turn a seed into latent vectors (numpy only).

PyTorch sampling, ONNX Runtime, the Triton client and the web page all draw z with this
function, so the same ``(seed, condition)`` gives the same image everywhere:

    z = numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal((n, z_dim), dtype=float32)
"""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**63 - 1


def z_from_seed(seed: int, n: int, z_dim: int) -> np.ndarray:
    """Draw ``n`` latent vectors for ``seed``.

    Args:
        seed: a non-negative integer below 2**63.
        n: number of vectors.
        z_dim: latent size.

    Returns:
        float32 array ``[n, z_dim]``, standard normal.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return rng.standard_normal((n, z_dim), dtype=np.float32)


def new_seed() -> int:
    """A fresh random seed (from the OS), for 'regenerate'."""
    return int(np.random.default_rng().integers(0, 2**31 - 1))
