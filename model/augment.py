"""Differentiable augmentation of the critic's inputs (DiffAugment, Zhao et al. 2020; ADA,
Karras et al. 2020), for the small-data regime where D memorises the training images.

Every image D sees, real or generated, goes through the same random ops (each op applied
to an image with probability ``p``), and gradients flow through them to G, so G is never
asked to produce augmented images. The ops are chosen for chest films:

* ``translation``: integer shift by up to 1/8 of the side in x and y, edges replicated;
* ``cutout``: a square of half the side set to mid-grey (0 in [-1, 1]);
* ``brightness``: add U(-0.2, 0.2) (in [-1, 1] units);
* ``contrast``: scale about the image mean by U(0.7, 1.4).

Never a left-right flip (nor rotation): anatomy is not mirror-symmetric (heart on the
left), and a flip D accepted would teach G flipped films.

:class:`AdaptiveP` adjusts ``p`` towards a target overfitting heuristic
``r_t = E[sign(D(real))]`` (ADA): above the target D is too sure of the reals, p rises.
"""

from __future__ import annotations

from typing import Sequence

import torch

from model.schedule import AUGMENT_OPS

TRANSLATION = 0.125      # largest shift, fraction of the side
CUTOUT = 0.5             # side of the cut-out square, fraction of the side
BRIGHTNESS = 0.2         # largest offset in [-1, 1] units
CONTRAST = (0.7, 1.4)    # range of the contrast factor


def _uniform(n: int, gen: torch.Generator, device: torch.device, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=gen, device=device) * (hi - lo) + lo    # [n, 1, 1, 1]


def translate(x: torch.Tensor, gen: torch.Generator, ratio: float = TRANSLATION) -> torch.Tensor:
    """Shift each image by its own integer (dy, dx) in [-ratio * side, ratio * side]."""
    n, c, h, w = x.shape  # [N, C, H, W]
    sy, sx = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    dy = torch.randint(-sy, sy + 1, (n, 1), generator=gen, device=x.device)         # [N, 1]
    dx = torch.randint(-sx, sx + 1, (n, 1), generator=gen, device=x.device)
    rows = (torch.arange(h, device=x.device) + dy).clamp_(0, h - 1)                 # [N, H] source rows
    cols = (torch.arange(w, device=x.device) + dx).clamp_(0, w - 1)                 # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]          # [N, H, W, C]
    return out.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = CUTOUT) -> torch.Tensor:
    """Set a square (side ``ratio`` x the image side) at a random centre to 0 (mid-grey)."""
    n, _, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=gen, device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=gen, device=x.device)
    yy = torch.arange(h, device=x.device)[None, :, None]
    xx = torch.arange(w, device=x.device)[None, None, :]
    inside = ((yy - cy + ch // 2) >= 0) & ((yy - cy + ch // 2) < ch) & ((xx - cx + cw // 2) >= 0) & ((xx - cx + cw // 2) < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)                                  # [N, C, H, W]


def brightness(x: torch.Tensor, gen: torch.Generator, amount: float = BRIGHTNESS) -> torch.Tensor:
    return x + _uniform(x.shape[0], gen, x.device, -amount, amount).to(x.dtype)


def contrast(x: torch.Tensor, gen: torch.Generator, factors: tuple[float, float] = CONTRAST) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x.shape[0], gen, x.device, *factors).to(x.dtype) + mean


OPS = {"translation": translate, "cutout": cutout, "brightness": brightness, "contrast": contrast}
assert tuple(OPS) == AUGMENT_OPS


def augment(x: torch.Tensor, ops: Sequence[str], p: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply each op of ``ops`` (in order) to each image with probability ``p``.

    The random draws do not depend on ``p`` (every op is computed for the whole batch, then
    kept per image), so a run's random stream is the same for any ``p``, and ``p`` may be
    a 0-d tensor on the device (no host sync when it adapts).

    Args:
        x: [N, C, H, W] images in [-1, 1] (real or generated; differentiable).
        ops: names from :data:`model.schedule.AUGMENT_OPS`.
        p: probability per op and image, a float or a 0-d tensor.
        gen: the random generator (on ``x``'s device).

    Returns:
        [N, C, H, W], the same dtype.
    """
    if not ops:
        return x
    n = x.shape[0]
    for name in ops:
        keep = (torch.rand(n, 1, 1, 1, generator=gen, device=x.device) < p).to(x.dtype)   # [N, 1, 1, 1]
        x = x + keep * (OPS[name](x, gen) - x)
    return x


class AdaptiveP:
    """ADA's controller: ``p += sign(r_t - target) * images / (speed_kimg * 1000)``, in [0, 1].

    ``r_t`` is the mean of ``sign(D(real))`` since the last adjustment. ``p`` lives on the
    device as a 0-d tensor and is updated with tensor ops only (no host-device sync).
    """

    def __init__(self, p: float, target: float, speed_kimg: float, device: torch.device):
        self.target, self.speed_kimg = float(target), float(speed_kimg)
        self.p = torch.tensor(float(p), device=device)
        self._sign_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device)

    def accumulate(self, d_real: torch.Tensor) -> None:
        self._sign_sum += torch.sign(d_real.detach().float()).sum()
        self._count += d_real.shape[0]

    def stats(self) -> torch.Tensor:
        """[sign sum, count]: what DDP ranks add up before :meth:`adjust`."""
        return torch.stack([self._sign_sum, self._count])

    def adjust(self, stats: torch.Tensor, images: int) -> None:
        """Move p after ``images`` real images; ``stats`` is :meth:`stats` (summed over ranks)."""
        rt = stats[0] / stats[1].clamp(min=1.0)
        step = torch.sign(rt - self.target) * (images / (self.speed_kimg * 1000.0))
        self.p = (self.p + step).clamp(0.0, 1.0)
        self._sign_sum.zero_()
        self._count.zero_()
