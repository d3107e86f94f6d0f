"""Differentiable augmentation of D's inputs: the ops, the probability, no flips, adaptive p."""

import pytest
import torch

from model.augment import AdaptiveP, augment, brightness, contrast, cutout, translate
from model.schedule import AUGMENT_OPS, TrainingError, check_recipe_values
from radsynth.config import TrainConfig


def film(n=64, res=32):
    """An asymmetric 'film': bright left half, dark right half, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, res, res), -0.8)
    x[..., : res // 2] = 0.8
    return x + 0.05 * torch.randn(x.shape, generator=g)


def test_no_op_ever_flips_left_and_right():
    x = film()
    res = x.shape[-1]
    flipped = x.flip(-1)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        y = augment(x, AUGMENT_OPS, 1.0, g)            # every op on every image
        left, right = y[..., : res // 4].mean(dim=(1, 2, 3)), y[..., -res // 4:].mean(dim=(1, 2, 3))
        assert (left > right).all(), f"seed {seed}: an image came out mirrored"
        same = ((y - x) ** 2).mean(dim=(1, 2, 3))
        mirror = ((y - flipped) ** 2).mean(dim=(1, 2, 3))
        assert (same < mirror).all()
    assert not {"flip", "xflip", "hflip"} & set(AUGMENT_OPS)
    with pytest.raises(TrainingError, match="no flips"):
        check_recipe_values(TrainConfig(augment=("translation", "xflip")))


def test_each_op_does_what_it_says():
    x = film(n=8)
    g = torch.Generator().manual_seed(1)
    t = translate(x, g)
    assert t.shape == x.shape and not torch.equal(t, x)
    # a shift keeps the set of columns (up to the replicated edge): every output column is an input column
    cols_in = {tuple(col.tolist()) for col in x[0, 0].T}
    assert all(tuple(col.tolist()) in cols_in for col in t[0, 0].T)
    c = cutout(x, g)
    for img in (c[:, 0] == 0):                                          # one box of mid-grey per image, at most half the side,
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()   # clipped where it leaves the image
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert img.sum() == len(rows) * len(cols) and rows.diff().eq(1).all() and cols.diff().eq(1).all()
    b = brightness(x, g)
    offset = (b - x).flatten(1)
    assert torch.allclose(offset.max(1).values, offset.min(1).values, atol=1e-6) and offset.abs().max() <= 0.2
    k = contrast(x, g)
    torch.testing.assert_close(k.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)


def test_probability_zero_is_identity_one_changes_all_and_gradients_flow():
    x = film(n=16).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    assert torch.equal(augment(x, AUGMENT_OPS, 0.0, g), x)
    y = augment(x, ("brightness",), 1.0, torch.Generator().manual_seed(3))
    assert ((y - x).abs().flatten(1).max(1).values > 0).all()
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))             # brightness is a shift: d/dx = 1
    share = [(augment(x.detach(), ("cutout",), 0.3, torch.Generator().manual_seed(s)) != x.detach()).flatten(1).any(1).float().mean()
             for s in range(30)]
    assert 0.2 < torch.stack(share).mean() < 0.4                        # applied to ~p of the images


def test_random_stream_does_not_depend_on_p():
    x = film(n=4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment(x, AUGMENT_OPS, 0.1, g1)
    augment(x, AUGMENT_OPS, 0.9, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_adaptive_p_rises_when_d_is_sure_of_the_reals_and_falls_otherwise():
    ada = AdaptiveP(0.0, target=0.6, speed_kimg=1.0, device=torch.device("cpu"))
    ada.accumulate(torch.ones(100))                                     # r_t = 1 > 0.6: overfitting
    ada.adjust(ada.stats(), images=200)
    assert ada.p.item() == pytest.approx(0.2)
    ada.accumulate(-torch.ones(100))                                    # r_t = -1 < 0.6
    ada.adjust(ada.stats(), images=500)
    assert ada.p.item() == 0.0                                          # clamped at 0
