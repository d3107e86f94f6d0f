"""WGAN-GP losses (Gulrajani et al., 2017) with the PG-GAN drift term.

Critic:    L_D = E[D(G(z, c), c)] - E[D(x, c)]
                 + lambda * E[(||grad_x_hat D(x_hat, c)||_2 - 1)^2]
                 + epsilon * E[D(x, c)^2]
Generator: L_G = -E[D(G(z, c), c)]

``x_hat = u * x + (1 - u) * G(z, c)``, ``u ~ U[0, 1]`` per sample, and the *same* class
``c`` for the real image, the fake and the interpolate: the penalty constrains the critic's
gradient along class-conditioned paths. The Wasserstein estimate logged during training is
``E[D(x, c)] - E[D(G(z, c), c)]``.
"""

from __future__ import annotations

import torch
from torch import nn


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``E[(||grad D(x_hat, c)||_2 - 1)^2]`` on class-conditioned interpolates.

    Args:
        D: the critic.
        real: [N, C, R, R] real images.
        fake: [N, C, R, R] generated images (detached).
        c: [N] int64 classes shared by real, fake and interpolate.
        u: [N, 1, 1, 1] interpolation weights in [0, 1].

    Returns:
        Scalar penalty, differentiable w.r.t. D's parameters (``create_graph=True``).
    """
    x_hat = torch.lerp(fake, real, u).detach().requires_grad_(True)      # [N, C, R, R]
    scores = D(x_hat, c)                                                 # [N]
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # [N, C, R, R]
    norm = grad.float().flatten(1).norm(2, dim=1)                         # [N]
    return (norm - 1.0).pow(2).mean()


def critic_loss(
    D: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    c: torch.Tensor,
    u: torch.Tensor,
    gp_lambda: float,
    drift_epsilon: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's WGAN-GP loss and its parts (detached) for logging.

    Returns:
        ``(loss, {"wasserstein", "gp", "drift"})``.
    """
    d_real = D(real, c).float()                                          # [N]
    d_fake = D(fake, c).float()                                          # [N]
    gp = gradient_penalty(D, real, fake, c, u)
    drift = d_real.pow(2).mean()
    loss = d_fake.mean() - d_real.mean() + gp_lambda * gp + drift_epsilon * drift
    stats = {"wasserstein": (d_real.mean() - d_fake.mean()).detach(), "gp": gp.detach(), "drift": drift.detach()}
    return loss, stats


def generator_loss(D: nn.Module, fake: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``-E[D(G(z, c), c)]``."""
    return -D(fake, c).float().mean()
