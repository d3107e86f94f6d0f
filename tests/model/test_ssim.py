"""One SSIM definition: evaluation, encoder report and web page give the same number for the same pair."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from model import ssim as S
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 1, 64, 64)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-60, 60, x.shape), 0, 255).astype(np.uint8)
    return x, y


def test_ssim_is_scikit_images_gaussian_ssim(pair):
    from skimage.metrics import structural_similarity

    x, y = pair
    ref = [structural_similarity(a[0] / 127.5 - 1, b[0] / 127.5 - 1, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) for a, b in zip(x, y)]
    # scikit-image averages over the image minus a border; ours over the valid region: the same pixels.
    np.testing.assert_allclose(S.ssim(x, y), ref, atol=1e-9)
    # ... and not scikit-image's defaults (7x7 uniform window, sample covariance), which the web page used to show.
    default = structural_similarity(x[0, 0], y[0, 0], data_range=255)
    assert abs(default - S.ssim(x[:1], y[:1])[0]) > 0.01


def test_uint8_and_minus_one_to_one_give_the_same_value(pair):
    x, y = pair
    as_float = lambda a: a.astype(np.float64) / 127.5 - 1  # noqa: E731
    np.testing.assert_allclose(S.ssim(x, y), S.ssim(as_float(x), as_float(y)), atol=1e-12)
    np.testing.assert_allclose(S.ms_ssim(x, y), S.ms_ssim(as_float(x), as_float(y)), atol=1e-12)
    assert np.allclose(S.ssim(x, x), 1.0) and np.allclose(S.ms_ssim(x, x), 1.0)
    assert S.ms_ssim(x, y).max() < 0.99


def test_web_page_encoder_report_and_evaluation_agree(pair):
    import torch

    from model.encoder import reconstruction_report
    from model.metrics import ssim as evaluation_ssim
    from serving.web.generation import ssim as web_ssim

    x, y = pair
    ours = S.ssim(x, y)
    np.testing.assert_allclose(evaluation_ssim(x, y), ours, atol=1e-12)
    assert [web_ssim(a, b) for a, b in zip(x, y)] == pytest.approx(list(ours), abs=1e-12)

    class Fixed(torch.nn.Module):  # G(z, c) returns y whatever z is: the report compares y with x
        z_dim = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, c):
            return torch.from_numpy(y[: len(z)].astype(np.float32) / 127.5 - 1)

    report = reconstruction_report(lambda t: torch.zeros(len(t), 4), Fixed(), x, np.zeros(len(x), np.int64))
    assert report.ssim == pytest.approx(float(ours.mean()), abs=1e-6)


@pytest.mark.parametrize("res, plan", [(8, (3, 2)), (16, (7, 2)), (32, (7, 3)), (64, (11, 3)), (128, (11, 4)), (256, (11, 5))])
def test_ms_ssim_plan_keeps_the_coarsest_scale_a_window_wide(res, plan):
    win, scales = S.ms_ssim_plan(res)
    assert (win, scales) == plan
    assert res // 2 ** (scales - 1) >= win


def test_the_module_needs_no_torch():
    code = "import sys, model.ssim; assert 'torch' not in sys.modules, 'model.ssim imported torch'"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
