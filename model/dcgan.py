"""The baseline variant ``dcgan``: a class-conditional DCGAN (Radford et al., 2016) at a
fixed full resolution, no growing, trained by the same WGAN-GP loop.

* G: ``[z, embed(c)]`` -> dense 4x4 -> (transposed conv 4x4 stride 2, BatchNorm, ReLU) per
  doubling -> 3x3 conv -> [-1, 1] (``model.output``).
* D: (conv 4x4 stride 2, LeakyReLU) per halving, no normalisation (batch norm would break
  the per-sample gradient penalty), conditioning by projection (default) or by concatenating
  a learned label map to the input (``model.dcgan_conditioning: concat``). Raw scores.

It exposes the same ``set_stage`` / ``resolution`` / ``alpha`` surface as the progressive
networks, fixed at ``(img_resolution, 1.0)``, so the trainer needs no special case.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.layers import LRELU_SLOPE, to_output_range
from model.networks import _Stageful, channels_at


class _Fixed(_Stageful):
    """The stage interface of the progressive networks, pinned to (img_resolution, alpha=1)."""

    progressive = False

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        if resolution != self.img_resolution or alpha != 1.0:
            raise ValueError(f"the dcgan variant runs only at ({self.img_resolution}, alpha=1), got ({resolution}, {alpha})")


class DCGANGenerator(_Fixed):
    """G(z, c) -> image [N, C, img_resolution, img_resolution] in [-1, 1]."""

    def __init__(
        self,
        z_dim: int,                                 # latent size
        num_classes: int,                           # conditions
        img_resolution: int,                        # fixed output resolution
        img_channels: int,
        label_dim: int = 32,                        # class embedding joined with z
        fmap_base: int = 4096,
        fmap_max: int = 256,
        fmap_min: int = 16,
        output: str = "tanh",                       # tanh | clamp
    ):
        super().__init__()
        self._init_generator(z_dim, num_classes, img_resolution, img_channels, output)
        nf = lambda r: channels_at(r, fmap_base, fmap_max, fmap_min)  # noqa: E731
        self.embed = nn.Embedding(num_classes, label_dim)
        self.input = nn.Linear(z_dim + label_dim, nf(4) * 16)
        self.input_bn = nn.BatchNorm2d(nf(4))
        layers: list[nn.Module] = []
        for res in self.resolutions[1:]:
            layers += [nn.ConvTranspose2d(nf(res // 2), nf(res), 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf(res)), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(nf(img_resolution), img_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: z [N, z_dim] float, c [N] int64. Returns [N, C, R, R] in [-1, 1]."""
        h = torch.cat([z, self.embed(c)], dim=1)                          # [N, z_dim + label_dim]
        x = self.input(h).reshape(z.shape[0], -1, 4, 4)                  # [N, C4, 4, 4]
        x = torch.relu(self.input_bn(x))
        x = self.body(x)                                                 # [N, C_R, R, R]
        return to_output_range(self.to_rgb(x), self.output)


class DCGANDiscriminator(_Fixed):
    """D(x, c) -> raw critic score [N]."""

    def __init__(
        self,
        num_classes: int,
        img_resolution: int,
        img_channels: int,
        fmap_base: int = 4096,
        fmap_max: int = 256,
        fmap_min: int = 16,
        conditioning: str = "projection",           # projection | concat
        twin_classifier: bool = False,              # projection only: a twin embedding that classifies fakes (TAC-GAN)
    ):
        super().__init__()
        if conditioning not in ("projection", "concat"):
            raise ValueError(f"model.dcgan_conditioning must be 'projection' or 'concat', got {conditioning!r}")
        self._init_stage(img_resolution)
        self.num_classes, self.img_resolution, self.img_channels = num_classes, img_resolution, img_channels
        self.conditioning = conditioning
        nf = lambda r: channels_at(r, fmap_base, fmap_max, fmap_min)  # noqa: E731
        extra = 1 if conditioning == "concat" else 0
        self.label_map = nn.Embedding(num_classes, img_resolution * img_resolution) if extra else None
        self.from_rgb = nn.Conv2d(img_channels + extra, nf(img_resolution), 3, padding=1)
        layers: list[nn.Module] = []
        for res in reversed(self.resolutions[1:]):
            layers += [nn.Conv2d(nf(res), nf(res // 2), 4, stride=2, padding=1), nn.LeakyReLU(LRELU_SLOPE)]
        self.body = nn.Sequential(*layers)
        c4 = nf(4)
        self.dense = nn.Linear(c4 * 16, c4)
        self.out = nn.Linear(c4, 1)
        self.embed = nn.Embedding(num_classes, c4) if conditioning == "projection" else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(c4))
        if twin_classifier and self.embed is None:
            raise ValueError("model.d_twin_classifier needs model.dcgan_conditioning: projection")
        self.embed_twin = nn.Embedding(num_classes, c4) if twin_classifier else None
        if self.embed_twin is not None:
            nn.init.normal_(self.embed_twin.weight, std=1.0 / math.sqrt(c4))

    def forward(self, x: torch.Tensor, c: torch.Tensor, logits: bool = False, twin: bool = False):
        """Args: x [N, C, R, R] in [-1, 1], c [N] int64. Returns raw scores [N]; with ``logits``
        (projection conditioning only) also every class's projection term [N, K]; with ``twin``
        too the twin head's logits [N, K] (TAC-GAN)."""
        if logits and self.embed is None:
            raise ValueError("class logits need the projection critic (model.dcgan_conditioning: projection)")
        if twin and (self.embed_twin is None or not logits):
            raise ValueError("twin logits need model.d_twin_classifier: true (and logits=True)")
        if tuple(x.shape[-2:]) != (self.img_resolution, self.img_resolution):
            raise ValueError(f"dcgan D expects {self.img_resolution}x{self.img_resolution} inputs, got {tuple(x.shape)}")
        if self.label_map is not None:
            lab = self.label_map(c).reshape(-1, 1, self.img_resolution, self.img_resolution)  # [N, 1, R, R]
            x = torch.cat([x, lab], dim=1)
        h = nn.functional.leaky_relu(self.from_rgb(x), LRELU_SLOPE)      # [N, C_R, R, R]
        h = self.body(h)                                                 # [N, C4, 4, 4]
        phi = nn.functional.leaky_relu(self.dense(h.flatten(1)), LRELU_SLOPE)  # [N, F]
        score = self.out(phi).squeeze(1)
        if logits:
            all_logits = phi @ self.embed.weight.t()                     # [N, K]
            score = score + all_logits.gather(1, c[:, None]).squeeze(1)
            return (score, all_logits, phi @ self.embed_twin.weight.t()) if twin else (score, all_logits)
        if self.embed is not None:
            score = score + (self.embed(c) * phi).sum(dim=1)
        return score
