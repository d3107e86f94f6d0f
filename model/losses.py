"""WGAN-GP losses (Gulrajani et al., 2017) with the PG-GAN drift term.

Critic:    L_D = E[D(G(z, c), c)] - E[D(x, c)]
                 + lambda * E[(||grad_x_hat D(x_hat, c)||_2 - 1)^2]
                 + epsilon * E[D(x, c)^2]
Generator: L_G = -E[D(G(z, c), c)]

``x_hat = u * x + (1 - u) * G(z, c)``, ``u ~ U[0, 1]`` per sample, and the *same* class
``c`` for the real image, the fake and the interpolate: the penalty constrains the critic's
gradient along class-conditioned paths. The Wasserstein estimate logged during training is
``E[D(x, c)] - E[D(G(z, c), c)]``.

Mode seeking (Mao et al., MSGAN, 2019), optional in G's loss: pairs of generated images of the
same class from different z, ``L_ms = E[1 / (mean|G(z1, c) - G(z2, c)| / mean|z1 - z2| + eps)]``,
weighted by ``train.mode_seeking``. It rewards G for images that move with z inside a class,
which the unconditional minibatch stddev of the critic does not see (a G that draws one image
per class still looks diverse across a mixed-class group).

Class cross-entropy on the projection logits, optional (``train.class_ce``): the projection
critic's per-class terms ``<embed(k), phi(x)>`` are a classifier's logits (the class-free
``w . phi(x)`` cancels in a softmax over k). D adds ``class_ce x CE(logits(x_real), c)`` and G
``class_ce x CE(logits(G(z, c)), c)``, AC-GAN's two terms (Odena et al., 2017) without a second
head. The WGAN projection term alone only rewards ``<embed(c), phi>`` for the asked class; the
cross-entropy also penalises a sample that scores as another class, which is what a
condition's leakage into its neighbours looks like.

Twin classifier, optional (``model.d_twin_classifier``, TAC-GAN: Gong et al., 2019): AC-GAN's G
term drives fakes to where the classifier is sure, so conditions that overlap in real data
(viral vs bacterial pneumonia) come out further apart than the reals are. A second embedding
of D, trained on the fakes (``class_ce x CE(twin_logits(G(z, c)), c)`` in D's loss), lets G
subtract what is easy about its own samples: G's class term becomes
``class_ce x (CE(logits(G(z, c)), c) - CE(twin_logits(G(z, c)), c))``, which at D's optimum
matches G's class posterior to the data's instead of sharpening it. ``class_ce_twin_g`` scales
the subtracted term (1: TAC-GAN; 0: AC-GAN's G term, the twin head only trained): between the
two, G's class posterior is sharpened part of the way.

Lazy regularisation (StyleGAN2): with ``gp_interval = k`` the penalty is computed on every
k-th critic step only and weighted ``k * lambda``, so its average pull is unchanged at about
1/k of its cost (the penalty's double backward is about half a critic step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    gp_weight: float,
    drift_epsilon: float,
    class_ce: float = 0.0,
    twin: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's WGAN-GP loss and its parts (detached) for logging.

    Args:
        gp_weight: weight of the gradient penalty on this step: ``gp_lambda``, or
            ``gp_interval * gp_lambda`` on a lazy step; 0 skips the penalty (not computed).
        class_ce: weight of the reals' class cross-entropy on the projection logits (0: off).
        twin: with ``class_ce``, also the twin head's cross-entropy on the fakes (same weight).

    Returns:
        ``(loss, stats)``: stats ``wasserstein``, ``drift``, ``d_real`` (the scores, [N],
        for adaptive augmentation), ``class_ce`` when weighted, ``class_ce_twin`` with the twin,
        and, when the penalty was computed, ``gp``.
    """
    if class_ce > 0:
        d_real, logits = D(real, c, logits=True)
        d_real = d_real.float()                                          # [N]
        ce = F.cross_entropy(logits.float(), c)                          # the reals' class, from the projection logits
    else:
        d_real = D(real, c).float()                                      # [N]
    twin = twin and class_ce > 0
    if twin:
        d_fake, _, twin_logits = D(fake, c, logits=True, twin=True)
        d_fake = d_fake.float()                                          # [N]
        ce_twin = F.cross_entropy(twin_logits.float(), c)                # the fakes' class, from the twin head
    else:
        d_fake = D(fake, c).float()                                      # [N]
    drift = d_real.pow(2).mean()
    loss = d_fake.mean() - d_real.mean() + drift_epsilon * drift
    stats = {"wasserstein": (d_real.mean() - d_fake.mean()).detach(), "drift": drift.detach(), "d_real": d_real.detach()}
    if class_ce > 0:
        loss = loss + class_ce * ce
        stats["class_ce"] = ce.detach()
    if twin:
        loss = loss + class_ce * ce_twin
        stats["class_ce_twin"] = ce_twin.detach()
    if gp_weight > 0:
        gp = gradient_penalty(D, real, fake, c, u)
        loss = loss + gp_weight * gp
        stats["gp"] = gp.detach()
    return loss, stats


def generator_loss(D: nn.Module, fake: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``-E[D(G(z, c), c)]``."""
    return -D(fake, c).float().mean()


def generator_class_losses(D: nn.Module, fake: torch.Tensor, c: torch.Tensor,
                           twin: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(-E[D(G(z, c), c)], CE(projection logits of G(z, c), c), CE(twin logits, c) or None)``
    from one pass of D; G's class term is the second minus the third (TAC-GAN) with ``twin``."""
    score, logits, *twin_logits = D(fake, c, logits=True, twin=twin)
    ce_twin = F.cross_entropy(twin_logits[0].float(), c) if twin else None
    return -score.float().mean(), F.cross_entropy(logits.float(), c), ce_twin


def generator_total(adv: torch.Tensor, ms: torch.Tensor | None = None, ce: torch.Tensor | None = None,
                    ce_twin: torch.Tensor | None = None, *, mode_seeking: float = 0.0, class_ce: float = 0.0,
                    class_ce_twin_g: float = 1.0) -> torch.Tensor:
    """G's loss from its parts: ``adv + mode_seeking x ms + class_ce x (ce - class_ce_twin_g x ce_twin)``
    (a part that is None is not in the run)."""
    total = adv
    if ms is not None:
        total = total + mode_seeking * ms
    if ce is not None:
        total = total + class_ce * ce
    if ce_twin is not None:
        total = total - class_ce * class_ce_twin_g * ce_twin      # TAC-GAN: G pushes the twin head's CE up
    return total


def mode_seeking_loss(fake: torch.Tensor, z: torch.Tensor, pairs: int, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's term on the first ``2 * pairs`` samples: sample ``i`` and ``i + pairs`` share a class.

    Args:
        fake: [N, C, R, R] generated images (with grad), N >= 2 * pairs.
        z: [N, z_dim] their latents.
        pairs: number of pairs (>= 1).

    Returns:
        Scalar ``mean_i 1 / (mean|fake_i - fake_{i+P}| / mean|z_i - z_{i+P}| + eps)``.
    """
    a, b = fake[:pairs].float(), fake[pairs:2 * pairs].float()
    d_img = (a - b).abs().flatten(1).mean(1)                           # [P]
    d_z = (z[:pairs] - z[pairs:2 * pairs]).abs().mean(1)               # [P]
    return (1.0 / (d_img / d_z + eps)).mean()


class LossStats:
    """Running means of named training statistics (0-d tensors, kept on the device).

    ``add(name=value, ...)`` accumulates; ``means()`` returns ``{name: float}`` over the
    values added since the last ``reset`` (the one host sync, at log time). A name added on
    some steps only (the lazy gradient penalty) is averaged over the steps it was added.
    """

    def __init__(self):
        self._sum: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, v in values.items():
            v = v.detach().float()
            self._sum[name] = self._sum[name] + v if name in self._sum else v.clone()
            self._n[name] = self._n.get(name, 0) + 1

    def names(self) -> list[str]:
        return sorted(self._sum)

    def means(self) -> dict[str, float]:
        if not self._sum:
            return {}
        names = sorted(self._sum)
        values = (torch.stack([self._sum[k] for k in names]) / torch.tensor([float(self._n[k]) for k in names],
                                                                          device=self._sum[names[0]].device)).tolist()
        return dict(zip(names, values))

    def reset(self) -> None:
        self._sum.clear()
        self._n.clear()
