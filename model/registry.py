"""The one place variants are declared: ``VARIANTS[model.variant]`` builds (G, D).

Adding a variant means adding one entry here (a builder taking the typed
:class:`~radsynth.config.ModelConfig`); the trainer, checkpoints, evaluation and export
only use the common surface every G/D has: ``G(z, c)``, ``D(x, c)``, ``set_stage``,
``resolution``, ``alpha``, ``progressive`` and the StyleGAN attribute names.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from model.schedule import PROGRESSIVE_VARIANTS
from radsynth.config import ModelConfig
from radsynth.errors import RadsynthError

if TYPE_CHECKING:   # torch is imported only when networks are built (the KFP compile needs none)
    from torch import nn

Builder = Callable[[ModelConfig, int, int, int], Any]   # -> (G, D)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered model variant."""

    build: Builder          # (model_cfg, num_classes, img_channels, img_resolution) -> (G, D)
    progressive: bool       # trained stage by stage with fade-in, or at full resolution only
    description: str


def _build_pgcgan_sa(cfg: ModelConfig, num_classes: int, img_channels: int, img_resolution: int) -> tuple[nn.Module, nn.Module]:
    from model.networks import ProgressiveDiscriminator, ProgressiveGenerator

    fmaps = dict(fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, fmap_min=cfg.fmap_min)
    G = ProgressiveGenerator(
        z_dim=cfg.z_dim, num_classes=num_classes, img_resolution=img_resolution, img_channels=img_channels,
        label_dim=cfg.label_dim, attention_resolutions=cfg.attention_resolutions, equalized_lr=cfg.equalized_lr,
        pixel_norm=cfg.pixel_norm, output=cfg.output, fade_after_output=cfg.fade_after_output,
        separate_label_norm=cfg.separate_label_norm, light_resolutions=cfg.light_resolutions,
        class_modulation=cfg.class_modulation, **fmaps,
    )
    D = ProgressiveDiscriminator(
        num_classes=num_classes, img_resolution=img_resolution, img_channels=img_channels,
        attention_resolutions=cfg.attention_resolutions, equalized_lr=cfg.equalized_lr,
        mbstd_group=cfg.mbstd_group, embed_equalized=cfg.d_embed_equalized, light_resolutions=cfg.light_resolutions,
        twin_classifier=cfg.d_twin_classifier, **fmaps,
    )
    return G, D


def _build_dcgan(cfg: ModelConfig, num_classes: int, img_channels: int, img_resolution: int) -> tuple[nn.Module, nn.Module]:
    from model.dcgan import DCGANDiscriminator, DCGANGenerator

    fmaps = dict(fmap_base=cfg.fmap_base, fmap_max=cfg.fmap_max, fmap_min=cfg.fmap_min)
    G = DCGANGenerator(
        z_dim=cfg.z_dim, num_classes=num_classes, img_resolution=img_resolution, img_channels=img_channels,
        label_dim=cfg.label_dim, output=cfg.output, **fmaps,
    )
    D = DCGANDiscriminator(
        num_classes=num_classes, img_resolution=img_resolution, img_channels=img_channels,
        conditioning=cfg.dcgan_conditioning, twin_classifier=cfg.d_twin_classifier, **fmaps,
    )
    return G, D


VARIANTS: dict[str, Variant] = {
    "pgcgan-sa": Variant(_build_pgcgan_sa, progressive=True,
                         description="conditional progressive-growing WGAN-GP with self-attention (default)"),
    "dcgan": Variant(_build_dcgan, progressive=False,
                     description="conditional DCGAN baseline at full resolution"),
}


assert {k for k, v in VARIANTS.items() if v.progressive} == PROGRESSIVE_VARIANTS, "model.schedule.PROGRESSIVE_VARIANTS is stale"


def get_variant(name: str) -> Variant:
    """The registered variant ``name``; a clear error naming the known ones otherwise."""
    if name not in VARIANTS:
        raise RadsynthError(f"model.variant {name!r} is not registered (known: {', '.join(sorted(VARIANTS))})")
    return VARIANTS[name]


def build_networks(
    model_cfg: ModelConfig,
    num_classes: int,
    img_channels: int,
    img_resolution: int,
    seed: int | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Build the (G, D) pair of ``model_cfg.variant``.

    Args:
        model_cfg: the ``model:`` section.
        num_classes: number of conditions (>= 1).
        img_channels: image channels (1 grey, 3 RGB, ...).
        img_resolution: final resolution, a power of two >= 4.
        seed: when given, the initial weights come from ``torch.manual_seed(seed)`` without
            touching the caller's global RNG state.

    Returns:
        ``(G, D)`` at stage ``(img_resolution, alpha=1)``. Both carry ``model_cfg``, ``variant``,
        ``num_classes``, ``img_resolution``, ``img_channels``; G also ``z_dim``.
    """
    import torch

    variant = get_variant(model_cfg.variant)
    if num_classes < 1:
        raise RadsynthError(f"num_classes must be >= 1, got {num_classes}")
    if img_channels < 1:
        raise RadsynthError(f"img_channels must be >= 1, got {img_channels}")
    if img_resolution < 4 or img_resolution & (img_resolution - 1):
        raise RadsynthError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
    try:
        if seed is None:
            G, D = variant.build(model_cfg, num_classes, img_channels, img_resolution)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                G, D = variant.build(model_cfg, num_classes, img_channels, img_resolution)
    except ValueError as exc:
        raise RadsynthError(f"model config: {exc}") from None
    for net in (G, D):
        net.model_cfg = model_cfg
        net.variant = model_cfg.variant
    return G, D
