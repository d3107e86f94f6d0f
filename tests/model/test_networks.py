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


@pytest.mark.parametrize("img_resolution", [256, 512])
def test_large_resolutions_shapes_and_fade_in_with_tiny_widths(img_resolution):
    """Sites with larger archives: the progressive pair runs every stage up to 256 / 512."""
    cfg = tiny_model_config(fmap_base=64, fmap_max=8, fmap_min=2, attention_resolutions=(8,))
    G, D = build_networks(cfg, CLASSES, 1, img_resolution, seed=0)
    assert G.resolutions[-1] == img_resolution and D.resolutions == G.resolutions
    z, c = torch.randn(2, 16), torch.tensor([0, 2])
    top, prev_res = img_resolution, img_resolution // 2
    G.set_stage(prev_res, 1.0)
    prev = G(z, c)
    G.set_stage(top, 0.0)
    assert torch.equal(G(z, c), upsample2x(prev))                       # fade-in identity at the top stage
    G.set_stage(top, 0.5)
    x = G(z, c)
    assert x.shape == (2, 1, top, top) and torch.isfinite(x).all()
    D.set_stage(prev_res, 1.0)
    d_prev = D(downsample2x(x), c)
    D.set_stage(top, 0.0)
    torch.testing.assert_close(D(x, c), d_prev, rtol=0, atol=1e-5)
    D.set_stage(top, 0.5)
    assert D(x, c).shape == (2,)


@pytest.mark.parametrize("fade_after_output", [True, False])
def test_fade_blends_images_after_the_output_map_or_before_it(fade_after_output):
    G, _ = build_networks(tiny_model_config(fade_after_output=fade_after_output), CLASSES, 1, 16, seed=4)
    z, c = inputs()
    with torch.no_grad():            # a large to_rgb makes tanh's non-linearity visible
        G.to_rgb["16"].weight.mul_(20.0)
        G.to_rgb["8"].weight.mul_(20.0)
    G.set_stage(8, 1.0)
    old = upsample2x(G(z, c))
    G.set_stage(16, 1.0)
    new = G(z, c)
    G.set_stage(16, 0.3)
    after = torch.lerp(old, new, 0.3)                                   # what the reals get
    assert torch.allclose(G(z, c), after, atol=1e-6) == fade_after_output


def test_label_embedding_is_normalised_apart_from_z():
    G, _ = build_networks(tiny_model_config(separate_label_norm=True), CLASSES, 1, 16, seed=5)
    G_joint, _ = build_networks(tiny_model_config(separate_label_norm=False), CLASSES, 1, 16, seed=5)
    z, c = inputs()
    z_big = z * 100.0                 # separately normalised: the scale of z cannot drown the class
    torch.testing.assert_close(G(z_big, c), G(z, c), rtol=0, atol=1e-5)
    c1 = torch.tensor([1, 2, 0, 0])
    share = (G(z_big, c) - G(z_big, c1)).abs().mean()
    assert share > 1e-3
    # jointly normalised, a long z vector outweighs the 8-dim embedding (the legacy behaviour)
    assert (G_joint(z_big, c) - G_joint(z_big, c1)).abs().mean() < 0.5 * share


def test_equalised_d_embedding_has_unit_weights_and_runtime_scale():
    _, D = build_networks(tiny_model_config(d_embed_equalized=True), CLASSES, 1, 16, seed=6)
    _, D_plain = build_networks(tiny_model_config(d_embed_equalized=False), CLASSES, 1, 16, seed=6)
    dim = D.embed.weight.shape[1]
    assert D.embed.scale == pytest.approx(dim**-0.5) and D_plain.embed.scale == 1.0
    assert 0.7 < D.embed.weight.std().item() < 1.3 and D_plain.embed.weight.std().item() < 0.5
    c = torch.tensor([0, 1, 2])
    torch.testing.assert_close(D.embed(c), D.embed.weight[c] * dim**-0.5)


def test_light_resolutions_use_one_conv_and_keep_shapes_and_identities():
    full_G, full_D = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=7)
    G, D = build_networks(tiny_model_config(light_resolutions=(16,)), CLASSES, 1, 16, seed=7)
    assert len(G.blocks["16"]) == 1 and len(D.blocks["16"]) == 1 and len(G.blocks["8"]) == 2
    assert sum(p.numel() for p in G.parameters()) < sum(p.numel() for p in full_G.parameters())
    z, c = inputs()
    G.set_stage(8, 1.0)
    prev = G(z, c)
    G.set_stage(16, 0.0)
    assert torch.equal(G(z, c), upsample2x(prev))
    G.set_stage(16, 1.0)
    x = G(z, c)
    assert x.shape == (N, 1, 16, 16) and D(x, c).shape == (N,)


def test_class_modulation_starts_as_the_plain_generator_and_conditions_every_layer():
    plain, _ = build_networks(tiny_model_config(), CLASSES, 1, 16, seed=8)
    G, _ = build_networks(tiny_model_config(class_modulation=True), CLASSES, 1, 16, seed=8)
    # zero tables, no RNG draws: the same weights and the same images at the start
    extra = set(G.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("modulation.") for k in extra)
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in plain.state_dict().items())
    z, c = inputs()
    assert torch.equal(G(z, c), plain(z, c))
    # one table per conv, sized by that conv's output channels
    assert [len(G.modulation[str(r)]) for r in (4, 8, 16)] == [len(G.blocks[str(r)]) for r in (4, 8, 16)]
    assert G.modulation["16"][1].gain.shape == (CLASSES, G.blocks["16"][1].weight.shape[0])
    # a bias for class 2 at the last 16x16 conv changes class-2 images only
    with torch.no_grad():
        G.modulation["16"][1].bias[2] = 1.0
    out = G(z, c)
    changed = (out - plain(z, c)).abs().flatten(1).amax(dim=1)
    assert changed[2] > 1e-3 and torch.equal(changed[[0, 1, 3]], torch.zeros(3))
    G.set_stage(8, 1.0)
    plain.set_stage(8, 1.0)
    assert torch.equal(G(z, c), plain(z, c))       # the 16x16 tables do not reach the 8x8 stage
    # it learns: the tables get gradients
    G.set_stage(16, 1.0)
    G(z, torch.tensor([0, 1, 1, 0])).sum().backward()
    grad = G.modulation["8"][0].gain.grad
    assert grad[:2].abs().sum() > 0 and torch.equal(grad[2], torch.zeros_like(grad[2]))   # class 2 absent
