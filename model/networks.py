"""The default variant ``pgcgan-sa``: a class-conditional progressive-growing G and critic D
with self-attention (PG-GAN, Karras et al. 2018; SAGAN, Zhang et al. 2019; projection
critic, Miyato & Koyama 2018).

Both networks are built for the final ``img_resolution`` and run at a *stage*
resolution ``R`` (4, 8, ..., img_resolution) with a fade-in weight ``alpha``:

* G: ``out = lerp(upsample(act(toRGB_{R/2}(h_{R/2}))), act(toRGB_R(h_R)), alpha)`` with
  ``act`` the output map to [-1, 1] (``model.output``: tanh by default), so G's blend is the
  same blend of images in [-1, 1] that the real images get (``model.fade_after_output``;
  false blends before the map). Upsampling is nearest-neighbour, so at ``alpha = 0`` the
  output equals the previous stage's output, upsampled.
* D: ``h = lerp(fromRGB_{R/2}(downsample(x)), block_R(fromRGB_R(x)), alpha)`` and then the
  remaining blocks down to 4x4, minibatch stddev, and a raw score
  ``w . phi(x) + <embed(c), phi(x)>`` (projection conditioning, no sigmoid).

G's input is ``[pixelnorm(z), pixelnorm(embed(c))]`` (``model.separate_label_norm``; false
normalises the joined vector, where z outweighs a short embedding). Blocks at
``model.light_resolutions`` have one 3x3 convolution instead of two (the full-resolution
blocks dominate the cost). The critic's class embedding is equalised like its other layers
(``model.d_embed_equalized``). With ``model.class_modulation`` every convolution of G is
followed by a class-dependent per-channel gain and bias (``ClassModulation``, zero at the
start), so each resolution's layers see the condition directly.

``set_stage(resolution, alpha)`` selects the stage; a trained G is at
``(img_resolution, 1.0)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.layers import (
    LRELU_GAIN,
    ClassModulation,
    EqualizedConv2d,
    EqualizedEmbedding,
    EqualizedLinear,
    MinibatchStdDev,
    PixelNorm,
    SelfAttention,
    check_resolution,
    downsample2x,
    lrelu,
    to_output_range,
    upsample2x,
)


def channels_at(res: int, fmap_base: int, fmap_max: int, fmap_min: int) -> int:
    """Feature maps at resolution ``res``: ``clamp(fmap_base // res, fmap_min, fmap_max)``."""
    return int(min(max(fmap_base // res, fmap_min), fmap_max))


def resolutions_up_to(img_resolution: int) -> list[int]:
    check_resolution("img_resolution", img_resolution)
    return [2**k for k in range(2, int(math.log2(img_resolution)) + 1)]


class _Stageful(nn.Module):
    """Holds the current stage (resolution, alpha) shared by G and D."""

    progressive = True

    def _init_stage(self, img_resolution: int) -> None:
        self.resolutions = resolutions_up_to(img_resolution)
        self.resolution = img_resolution
        self.alpha = 1.0

    def _init_generator(self, z_dim: int, num_classes: int, img_resolution: int, img_channels: int, output: str) -> None:
        """Stage state plus the attributes every generator exposes; validates ``output`` early."""
        self._init_stage(img_resolution)
        self.z_dim, self.num_classes = z_dim, num_classes
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.output = output
        to_output_range(torch.zeros(1), output)

    def set_stage(self, resolution: int, alpha: float = 1.0) -> None:
        """Run at ``resolution`` with fade-in weight ``alpha`` in [0, 1]."""
        if resolution not in self.resolutions:
            raise ValueError(f"stage resolution {resolution} not in {self.resolutions}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.resolution = int(resolution)
        self.alpha = float(alpha)


class ProgressiveGenerator(_Stageful):
    """G(z, c) -> image [N, C, R, R] in [-1, 1] at the current stage resolution R."""

    def __init__(
        self,
        z_dim: int,                                 # latent size
        num_classes: int,                           # conditions
        img_resolution: int,                        # final resolution (power of two)
        img_channels: int,                          # 1 (grey) or more
        label_dim: int = 32,                        # class embedding joined with z
        fmap_base: int = 4096,                      # channel schedule, see channels_at
        fmap_max: int = 256,
        fmap_min: int = 16,
        attention_resolutions: tuple[int, ...] = (32,),  # self-attention after these blocks
        equalized_lr: bool = True,                  # runtime He scaling
        pixel_norm: bool = True,                    # per-pixel feature normalisation
        output: str = "tanh",                       # tanh | clamp
        fade_after_output: bool = True,             # blend the two stages' images after the output map
        separate_label_norm: bool = True,           # normalise z and embed(c) each on its own
        light_resolutions: tuple[int, ...] = (),    # one 3x3 conv (not two) in these blocks
        class_modulation: bool = False,             # class-dependent gain and bias after every conv
    ):
        super().__init__()
        self._init_generator(z_dim, num_classes, img_resolution, img_channels, output)
        nf = lambda r: channels_at(r, fmap_base, fmap_max, fmap_min)  # noqa: E731
        eq = equalized_lr
        self.fade_after_output = fade_after_output
        self.separate_label_norm = separate_label_norm
        self.embed = nn.Embedding(num_classes, label_dim)
        self.norm = PixelNorm() if pixel_norm else nn.Identity()
        self.input = EqualizedLinear(z_dim + label_dim, nf(4) * 16, gain=LRELU_GAIN / 4, equalized=eq)
        self.blocks = nn.ModuleDict()
        self.to_rgb = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        for res in self.resolutions:
            c_in = nf(4) if res == 4 else nf(res // 2)
            if res == 4:
                self.blocks[str(res)] = nn.ModuleList([EqualizedConv2d(nf(4), nf(4), 3, equalized=eq)])
            elif res in light_resolutions:
                self.blocks[str(res)] = nn.ModuleList([EqualizedConv2d(c_in, nf(res), 3, equalized=eq)])
            else:
                self.blocks[str(res)] = nn.ModuleList([
                    EqualizedConv2d(c_in, nf(res), 3, equalized=eq),
                    EqualizedConv2d(nf(res), nf(res), 3, equalized=eq),
                ])
            if res in attention_resolutions:
                self.attention[str(res)] = SelfAttention(nf(res), equalized=eq)
            self.to_rgb[str(res)] = EqualizedConv2d(nf(res), img_channels, 1, gain=1.0, equalized=eq)
        # zero-initialised (no draws from the RNG), so the other weights are the same either way
        self.modulation = nn.ModuleDict({
            str(res): nn.ModuleList([ClassModulation(num_classes, conv.weight.shape[0]) for conv in self.blocks[str(res)]])
            for res in self.resolutions
        }) if class_modulation else None

    def _block(self, res: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if res > 4:
            x = upsample2x(x)
        for i, conv in enumerate(self.blocks[str(res)]):
            h = conv(x)
            if self.modulation is not None:
                h = self.modulation[str(res)][i](h, c)
            x = self.norm(lrelu(h))
        if str(res) in self.attention:
            x = self.attention[str(res)](x)
        return x

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: z [N, z_dim] float, c [N] int64. Returns [N, C, R, R] in [-1, 1]."""
        res, alpha = self.resolution, self.alpha
        if self.separate_label_norm:
            h = torch.cat([self.norm(z), self.norm(self.embed(c))], dim=1)   # [N, z_dim + label_dim]
        else:
            h = self.norm(torch.cat([z, self.embed(c)], dim=1))
        x = self.norm(lrelu(self.input(h))).reshape(z.shape[0], -1, 4, 4)  # [N, C4, 4, 4]
        prev = x
        for r in self.resolutions:
            if r > res:
                break
            prev = x
            x = self._block(r, x, c)                                     # [N, C_r, r, r]
        out = self.to_rgb[str(res)](x)                                   # [N, C, R, R]
        if res == 4 or alpha >= 1.0:
            return to_output_range(out, self.output)
        old = upsample2x(self.to_rgb[str(res // 2)](prev))               # [N, C, R, R]
        if self.fade_after_output:
            return torch.lerp(to_output_range(old, self.output), to_output_range(out, self.output), alpha)
        return to_output_range(torch.lerp(old, out, alpha), self.output)


class ProgressiveDiscriminator(_Stageful):
    """D(x, c) -> raw critic score [N]; the stage resolution is the input's size."""

    def __init__(
        self,
        num_classes: int,                           # conditions
        img_resolution: int,                        # final resolution
        img_channels: int,
        fmap_base: int = 4096,
        fmap_max: int = 256,
        fmap_min: int = 16,
        attention_resolutions: tuple[int, ...] = (32,),  # self-attention before these blocks
        equalized_lr: bool = True,
        mbstd_group: int = 4,                       # 0: no minibatch stddev
        embed_equalized: bool = True,               # equalised projection embedding
        twin_classifier: bool = False,              # a twin embedding that classifies fakes (TAC-GAN)
        light_resolutions: tuple[int, ...] = (),    # one 3x3 conv (not two) in these blocks
    ):
        super().__init__()
        self._init_stage(img_resolution)
        self.num_classes, self.img_resolution, self.img_channels = num_classes, img_resolution, img_channels
        nf = lambda r: channels_at(r, fmap_base, fmap_max, fmap_min)  # noqa: E731
        eq = equalized_lr
        self.from_rgb = nn.ModuleDict({str(r): EqualizedConv2d(img_channels, nf(r), 1, equalized=eq) for r in self.resolutions})
        self.blocks = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        for res in self.resolutions[1:]:
            if res in attention_resolutions:
                self.attention[str(res)] = SelfAttention(nf(res), equalized=eq)
            if res in light_resolutions:
                self.blocks[str(res)] = nn.ModuleList([EqualizedConv2d(nf(res), nf(res // 2), 3, equalized=eq)])
            else:
                self.blocks[str(res)] = nn.ModuleList([
                    EqualizedConv2d(nf(res), nf(res), 3, equalized=eq),
                    EqualizedConv2d(nf(res), nf(res // 2), 3, equalized=eq),
                ])
        self.mbstd = MinibatchStdDev(mbstd_group) if mbstd_group > 0 else None
        c4 = nf(4)
        self.final_conv = EqualizedConv2d(c4 + (1 if self.mbstd else 0), c4, 3, equalized=eq)
        self.final_dense = EqualizedLinear(c4 * 16, c4, equalized=eq)
        self.out = EqualizedLinear(c4, 1, gain=1.0, equalized=eq)
        self.embed = EqualizedEmbedding(num_classes, c4, equalized=embed_equalized and eq)  # projection conditioning
        self.embed_twin = EqualizedEmbedding(num_classes, c4, equalized=embed_equalized and eq) if twin_classifier else None

    def _block(self, res: int, x: torch.Tensor) -> torch.Tensor:
        if str(res) in self.attention:
            x = self.attention[str(res)](x)
        for conv in self.blocks[str(res)]:
            x = lrelu(conv(x))
        return downsample2x(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) [N, F]: the critic's features before the score (the stage comes from x)."""
        res, alpha = x.shape[-1], self.alpha
        if res not in self.resolutions or x.shape[-2] != res:
            raise ValueError(f"D input must be square with a side in {self.resolutions}, got {tuple(x.shape)}")
        h = lrelu(self.from_rgb[str(res)](x))                            # [N, C_R, R, R]
        if res > 4:
            h = self._block(res, h)                                      # [N, C_R/2, R/2, R/2]
            if alpha < 1.0 and res == self.resolution:
                old = lrelu(self.from_rgb[str(res // 2)](downsample2x(x)))  # [N, C_R/2, R/2, R/2]
                h = torch.lerp(old, h, alpha)
        for r in reversed(self.resolutions[1:]):
            if r < res:
                h = self._block(r, h)
        if self.mbstd is not None:
            h = self.mbstd(h)                                            # [N, C4 + 1, 4, 4]
        h = lrelu(self.final_conv(h))                                    # [N, C4, 4, 4]
        return lrelu(self.final_dense(h.flatten(1)))                     # [N, C4]

    def forward(self, x: torch.Tensor, c: torch.Tensor, logits: bool = False, twin: bool = False):
        """Args: x [N, C, R, R] in [-1, 1], c [N] int64. Returns raw scores [N]; with ``logits``
        also the projection term of every class, ``<embed(k), phi(x)>`` [N, K] (a classifier's
        logits: the class-independent ``w . phi(x)`` cancels in a softmax over classes); with
        ``twin`` too the twin head's logits ``<embed_twin(k), phi(x)>`` [N, K] (TAC-GAN)."""
        if twin and (self.embed_twin is None or not logits):
            raise ValueError("twin logits need model.d_twin_classifier: true (and logits=True)")
        phi = self.features(x)                                           # [N, F]
        if not logits:
            return self.out(phi).squeeze(1) + (self.embed(c) * phi).sum(dim=1)
        all_logits = phi @ (self.embed.weight * self.embed.scale).t()    # [N, K]
        score = self.out(phi).squeeze(1) + all_logits.gather(1, c[:, None]).squeeze(1)
        if not twin:
            return score, all_logits
        return score, all_logits, phi @ (self.embed_twin.weight * self.embed_twin.scale).t()
