import pytest
import torch
from torch import nn

from model.losses import critic_loss, generator_loss, generator_total, gradient_penalty, mode_seeking_loss
from model.registry import build_networks
from radsynth.errors import RadsynthError
from tests.model.conftest import tiny_model_config


class LinearCritic(nn.Module):
    """D(x, c) = <w_c, x>: its input gradient is w_c, so the penalty is known in closed form."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)        # [K, C, H, W]

    def forward(self, x, c):
        return (self.w[c] * x).flatten(1).sum(1)


def test_gradient_penalty_closed_form_on_linear_critic():
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0, 0, 0] = 3.0                 # ||w_0|| = 3
    w[1, 0] = 0.5                       # ||w_1|| = 1
    D = LinearCritic(w)
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    c = torch.tensor([0, 1, 0, 1])
    u = torch.rand(4, 1, 1, 1)
    gp = gradient_penalty(D, real, fake, c, u)
    torch.testing.assert_close(gp, torch.tensor(((3 - 1) ** 2 + 0 + (3 - 1) ** 2 + 0) / 4.0))
    # the penalty is differentiable w.r.t. the critic: d/dw_0 of mean((||w_0|| - 1)^2) over 2 of 4 samples
    gp.backward()
    torch.testing.assert_close(D.w.grad[0, 0, 0, 0], torch.tensor(2 * (3 - 1) * 1.0 * 2 / 4))


def test_gradient_penalty_equals_direct_autograd_on_network_critic():
    _, D = build_networks(tiny_model_config(mbstd_group=0), 3, 1, 16, seed=0)   # no batch coupling
    D.set_stage(16, 0.7)
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, torch.rand(5, 1, 16, 16, generator=g) * 2 - 1
    c = torch.tensor([0, 1, 2, 0, 1])
    u = torch.rand(5, 1, 1, 1, generator=g)
    expected = []
    for i in range(5):                  # one interpolate at a time, straight from the definition
        x_hat = (u[i] * real[i] + (1 - u[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(x_hat, c[i:i + 1]).sum(), x_hat)
        expected.append((grad.norm() - 1) ** 2)
    torch.testing.assert_close(gradient_penalty(D, real, fake, c, u), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_critic_and_generator_loss_values():
    w = torch.full((1, 1, 1, 1), 2.0)
    D = LinearCritic(w)                 # D(x) = 2x; gradient norm 2 everywhere -> gp = 1
    real, fake = torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), -0.25)
    c = torch.zeros(2, dtype=torch.long)
    loss, stats = critic_loss(D, real, fake, c, torch.full((2, 1, 1, 1), 0.3), gp_weight=10.0, drift_epsilon=1e-3)
    # E[D(fake)] - E[D(real)] + 10 * 1 + 1e-3 * E[D(real)^2] = -0.5 - 1 + 10 + 1e-3
    torch.testing.assert_close(loss, torch.tensor(-1.5 + 10.0 + 1e-3))
    torch.testing.assert_close(stats["wasserstein"], torch.tensor(1.5))
    torch.testing.assert_close(generator_loss(D, fake, c), torch.tensor(0.5))


def test_mode_seeking_loss_is_the_msgan_ratio_of_each_same_class_pair_and_pushes_pairs_apart():
    fake = torch.zeros(5, 1, 2, 2)
    fake[2] = 0.5                        # pair (0, 2): mean |image diff| 0.5
    fake[3] = 1.0                        # pair (1, 3): 1.0; sample 4 is unpaired and ignored
    fake[4] = 100.0
    z = torch.zeros(5, 3)
    z[2] = 2.0                           # mean |z diff| 2 and 1
    z[3] = 1.0
    value = mode_seeking_loss(fake, z, pairs=2, eps=0.0)
    torch.testing.assert_close(value, torch.tensor((1 / (0.5 / 2) + 1 / (1.0 / 1)) / 2))   # (4 + 1) / 2
    leaf = (torch.rand(6, 1, 4, 4) * 0.1).requires_grad_(True)
    zz = torch.randn(6, 3)
    before = (leaf[:3] - leaf[3:]).abs().mean().item()
    mode_seeking_loss(leaf, zz, pairs=3).backward()
    with torch.no_grad():
        leaf -= 1e-3 * leaf.grad
    assert (leaf[:3] - leaf[3:]).abs().mean().item() > before   # descending the term separates the pairs


def test_projection_logits_are_the_per_class_terms_and_weight_the_class_cross_entropy():
    from model.losses import generator_class_losses

    for variant in ("pgcgan-sa", "dcgan"):
        _, D = build_networks(tiny_model_config(variant=variant, mbstd_group=0), 3, 1, 16, seed=0)
        D.set_stage(16, 1.0)
        g = torch.Generator().manual_seed(2)
        real, fake = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
        c = torch.tensor([0, 1, 2, 0, 1, 2])
        score, logits = D(real, c, logits=True)
        assert logits.shape == (6, 3)
        torch.testing.assert_close(score, D(real, c))                       # the same critic score
        for k in range(3):                                                  # column k is the score's class-k part
            torch.testing.assert_close(D(real, torch.full_like(c, k)) - logits[:, k], D(real, c) - logits.gather(1, c[:, None])[:, 0])
        u = torch.rand(6, 1, 1, 1, generator=g)
        base, _ = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3)
        weighted, stats = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3, class_ce=0.5)
        ce = nn.functional.cross_entropy(logits, c)
        torch.testing.assert_close(stats["class_ce"], ce.detach())
        torch.testing.assert_close(weighted - base, 0.5 * ce)
        adv, ce_fake, _ = generator_class_losses(D, fake, c)
        torch.testing.assert_close(adv, generator_loss(D, fake, c))
        torch.testing.assert_close(ce_fake, nn.functional.cross_entropy(D(fake, c, logits=True)[1], c))
    _, concat = build_networks(tiny_model_config(variant="dcgan", dcgan_conditioning="concat"), 3, 1, 16, seed=0)
    with pytest.raises(ValueError, match="projection"):
        concat(real, c, logits=True)


def test_twin_classifier_trains_on_fakes_and_g_subtracts_its_cross_entropy():
    from model.losses import generator_class_losses

    for variant in ("pgcgan-sa", "dcgan"):
        _, plain = build_networks(tiny_model_config(variant=variant, mbstd_group=0), 3, 1, 16, seed=0)
        _, D = build_networks(tiny_model_config(variant=variant, mbstd_group=0, d_twin_classifier=True), 3, 1, 16, seed=0)
        for net in (plain, D):
            net.set_stage(16, 1.0)
        g = torch.Generator().manual_seed(3)
        real, fake = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
        c = torch.tensor([0, 1, 2, 0, 1, 2])
        torch.testing.assert_close(D(real, c), plain(real, c))                     # the twin is built last: same critic
        score, logits, twin_logits = D(fake, c, logits=True, twin=True)
        assert twin_logits.shape == (6, 3) and not torch.allclose(twin_logits, logits)
        torch.testing.assert_close(score, D(fake, c))
        u = torch.rand(6, 1, 1, 1, generator=g)
        one, _ = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3, class_ce=0.5)
        two, stats = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3, class_ce=0.5, twin=True)
        ce_twin = nn.functional.cross_entropy(twin_logits, c)
        torch.testing.assert_close(stats["class_ce_twin"], ce_twin.detach())
        torch.testing.assert_close(two - one, 0.5 * ce_twin)                       # D learns to classify the fakes
        off, _ = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3, twin=True)
        base, stats_off = critic_loss(D, real, fake, c, u, gp_weight=0.0, drift_epsilon=1e-3)
        torch.testing.assert_close(off, base)                                      # no class_ce: no twin term
        assert "class_ce_twin" not in stats_off
        adv, ce, ce_g_twin = generator_class_losses(D, fake, c, twin=True)
        torch.testing.assert_close(adv, generator_loss(D, fake, c))
        torch.testing.assert_close(ce, nn.functional.cross_entropy(logits, c))
        torch.testing.assert_close(ce_g_twin, ce_twin)
        assert generator_class_losses(D, fake, c)[2] is None
        with pytest.raises(ValueError, match="d_twin_classifier"):
            plain(fake, c, logits=True, twin=True)
        with pytest.raises(ValueError, match="d_twin_classifier"):
            D(fake, c, twin=True)                                                 # twin logits come with logits
    with pytest.raises(RadsynthError, match="projection"):
        build_networks(tiny_model_config(variant="dcgan", dcgan_conditioning="concat", d_twin_classifier=True), 3, 1, 16)


def test_generator_total_weights_each_part_and_scales_only_the_twin_term():
    adv, ms, ce, tw = (torch.tensor(v) for v in (-2.0, 0.5, 0.25, 1.5))
    assert generator_total(adv).item() == -2.0
    assert generator_total(adv, ms, mode_seeking=2.0).item() == pytest.approx(-1.0)
    full = generator_total(adv, ms, ce, tw, mode_seeking=2.0, class_ce=0.5)                   # TAC-GAN (share 1)
    assert full.item() == pytest.approx(-2.0 + 1.0 + 0.5 * (0.25 - 1.5))
    half = generator_total(adv, ms, ce, tw, mode_seeking=2.0, class_ce=0.5, class_ce_twin_g=0.5)
    assert half.item() == pytest.approx(-2.0 + 1.0 + 0.5 * (0.25 - 0.75))
    acgan = generator_total(adv, ms, ce, tw, mode_seeking=2.0, class_ce=0.5, class_ce_twin_g=0.0)
    assert acgan.item() == pytest.approx(generator_total(adv, ms, ce, mode_seeking=2.0, class_ce=0.5).item())
