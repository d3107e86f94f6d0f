import pytest
import torch

from model.layers import MinibatchStdDev, downsample2x, upsample2x
from model.registry import VARIANTS, build_networks
from radsynth.errors import RadsynthError
from tests.model.conftest import tiny_model_config

N, CLASSES = 4, 3


def inputs(z_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, z_dim, generator=g), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_full_resolution_shapes_range_and_attributes(variant, channels):
    G, D = build_networks(tiny_model_config(variant), CLASSES, channels, 16, seed=0)
    z, c = inputs()
    x = G(z, c)
    assert x.shape == (N, channels, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.abs().max() <= 1.0
    s = D(x, c)
    assert s.shape == (N,) and torch.isfinite(s).all()
    assert (G.z_dim, G.num_classes, G.img_resolution, G.img_channels) == (16, CLASSES, 16, channels)
    assert (G.resolution, G.alpha, G.variant) == (16, 1.0, variant)


@pytest.mark.parametrize("res", [4, 8, 16, 32])
def test_progressive_shapes_per_stage(res):
    G, D = build_networks(tiny_model_config(attention_resolutions=(8, 16)), CLASSES, 1, 32, seed=0)
    z, c = inputs()
    for alpha in (0.0, 0.5, 1.0):
        if res == 4 and alpha < 1:
            continue
        G.set_stage(res, alpha)
        D.set_stage(res, alpha)
        x = G(z, c)
        assert x.shape == (N, 1, res, res)
        assert D(x, c).shape == (N,)


def test_g_alpha_zero_equals_upsampled_previous_stage():
    G, _ = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=1)
    z, c = inputs()
    G.set_stage(8, 1.0)
    prev = G(z, c)
    G.set_stage(16, 0.0)
    assert torch.equal(G(z, c), upsample2x(prev))
    G.set_stage(16, 0.5)
    assert not torch.allclose(G(z, c), upsample2x(prev), atol=1e-4)


def test_d_alpha_zero_equals_previous_stage_on_downsampled_input():
    _, D = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=1)
    x = torch.rand(N, 1, 16, 16) * 2 - 1
    c = torch.tensor([0, 1, 2, 1])
    D.set_stage(8, 1.0)
    prev = D(downsample2x(x), c)
    D.set_stage(16, 0.0)
    torch.testing.assert_close(D(x, c), prev, rtol=0, atol=1e-6)


def test_alpha_one_old_path_no_longer_contributes():
    G, D = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=2)
    z, c = inputs()
    x = torch.rand(N, 1, 16, 16) * 2 - 1
    outs = {}
    for alpha in (1.0, 0.5):
        G.set_stage(16, alpha)
        D.set_stage(16, alpha)
        outs[alpha] = (G(z, c), D(x, c))
    with torch.no_grad():   # perturb the previous stage's toRGB / fromRGB (the old path only)
        for p in list(G.to_rgb["8"].parameters()) + list(D.from_rgb["8"].parameters()):
            p.add_(1.0)
    for alpha in (1.0, 0.5):
        G.set_stage(16, alpha)
        D.set_stage(16, alpha)
        g, d = G(z, c), D(x, c)
        same = torch.equal(g, outs[alpha][0]) and torch.equal(d, outs[alpha][1])
        assert same == (alpha == 1.0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_class_changes_g_and_d_output(variant):
    G, D = build_networks(tiny_model_config(variant), CLASSES, 1, 16, seed=3)
    G.eval()
    z, _ = inputs()
    x = torch.rand(N, 1, 16, 16) * 2 - 1
    c0, c1 = torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)
    assert (G(z, c0) - G(z, c1)).abs().mean() > 1e-3
    assert (D(x, c0) - D(x, c1)).abs().mean() > 1e-3


def test_seeded_build_is_reproducible_and_leaves_global_rng():
    state = torch.get_rng_state()
    G1, _ = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=7)
    G2, _ = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, a), (_, b) in zip(G1.state_dict().items(), G2.state_dict().items()):
        assert torch.equal(a, b), k


def test_minibatch_stddev_feature():
    x = torch.zeros(4, 2, 3, 3)
    x[1] = 2.0                       # group of 4: values 0, 2, 0, 0 -> std sqrt(0.75)
    y = MinibatchStdDev(4)(x)
    assert y.shape == (4, 3, 3, 3)
    torch.testing.assert_close(y[:, 2], torch.full((4, 3, 3), 0.75**0.5))
    assert MinibatchStdDev(4)(torch.randn(6, 2, 4, 4)).shape == (6, 3, 4, 4)   # group 3 divides 6


def test_bad_config_is_a_clear_error():
    with pytest.raises(RadsynthError, match="not registered"):
        build_networks(tiny_model_config("stylegan9"), CLASSES, 1, 16)
    with pytest.raises(RadsynthError, match="power of two"):
        build_networks(tiny_model_config(), CLASSES, 1, 24)
    with pytest.raises(RadsynthError, match="model.output"):
        build_networks(tiny_model_config(output="sigmoid"), CLASSES, 1, 16)
    G, _ = build_networks(tiny_model_config("dcgan"), CLASSES, 1, 16)
    with pytest.raises(ValueError, match="only at"):
        G.set_stage(8, 1.0)
