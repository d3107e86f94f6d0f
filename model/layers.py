"""Building blocks shared by the networks: equalised-LR layers, pixel norm, minibatch
standard deviation, self-attention and class projection.

Equalised learning rate (Karras et al., PG-GAN, 2018): weights are drawn from N(0, 1) and
multiplied at run time by the He constant ``gain / sqrt(fan_in)``, so Adam's per-parameter
step sizes act alike on every layer. With ``equalized=False`` the same layers use ordinary
He-initialised weights (scale 1), which keeps one code path for both choices.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0 / (1.0 + LRELU_SLOPE**2))


class EqualizedLinear(nn.Module):
    """Fully connected layer with (optionally) equalised learning rate."""

    def __init__(self, in_features: int, out_features: int, gain: float = LRELU_GAIN, equalized: bool = True, bias_init: float = 0.0):
        super().__init__()
        he = gain / math.sqrt(in_features)
        init_std = 1.0 if equalized else he
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * init_std)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = he if equalized else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    """Conv2d (stride 1, 'same' padding) with (optionally) equalised learning rate."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = LRELU_GAIN, equalized: bool = True):
        super().__init__()
        he = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        init_std = 1.0 if equalized else he
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size) * init_std)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = he if equalized else 1.0
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedEmbedding(nn.Module):
    """Class embedding (a lookup table) with (optionally) equalised learning rate.

    Equalised: entries drawn from N(0, 1) and scaled at run time by ``1 / sqrt(dim)``, so
    Adam moves them at the same relative rate as the equalised layers around them. Plain:
    entries drawn with std ``1 / sqrt(dim)`` (the same initial function), scale 1.
    """

    def __init__(self, num_embeddings: int, dim: int, equalized: bool = True):
        super().__init__()
        std = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim) * (1.0 if equalized else std))
        self.scale = std if equalized else 1.0

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return F.embedding(c, self.weight) * self.scale


class ClassModulation(nn.Module):
    """Class-conditional per-channel gain and bias: ``x * (1 + gain[c]) + bias[c]``.

    Both tables start at zero, so a freshly built layer is the identity and the network
    starts as it would without it. They are plain parameters, like the convolutions'
    biases (Adam moves them by about ``lr`` a step). Conditional batch norm's affine part
    (de Vries et al. 2017; BigGAN) without the normalisation: it gives every layer of G
    the condition, not only its input.
    """

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(num_classes, channels))
        self.bias = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: x [N, C, H, W], c [N] int64. Returns [N, C, H, W]."""
        gain = F.embedding(c, self.gain)[:, :, None, None]     # [N, C, 1, 1]
        bias = F.embedding(c, self.bias)[:, :, None, None]     # [N, C, 1, 1]
        return x * (1.0 + gain) + bias


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit average square (PG-GAN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class MinibatchStdDev(nn.Module):
    """Append one feature map: the mean standard deviation over groups of the minibatch.

    Gives the critic a direct view of sample diversity, which penalises mode collapse.
    The group is the largest divisor of the batch not above ``group_size``.
    """

    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape  # [N, C, H, W]
        g = min(self.group_size, n)
        while n % g:
            g -= 1
        y = x.reshape(g, n // g, c, h, w)                       # [G, M, C, H, W]
        y = (y - y.mean(dim=0)).pow(2).mean(dim=0)              # [M, C, H, W]
        y = (y + 1e-8).sqrt().mean(dim=(1, 2, 3))                # [M]
        y = y.reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)  # [N, 1, H, W]
        return torch.cat([x, y], dim=1)


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al., 2019): ``x + gamma * attention(x)``.

    ``gamma`` starts at 0, so a freshly added block is the identity and the network learns
    how much non-local context to mix in.
    """

    def __init__(self, channels: int, equalized: bool = True):
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = EqualizedConv2d(channels, inner, 1, gain=1.0, equalized=equalized)
        self.key = EqualizedConv2d(channels, inner, 1, gain=1.0, equalized=equalized)
        self.value = EqualizedConv2d(channels, channels, 1, gain=1.0, equalized=equalized)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape  # [N, C, H, W]
        q = self.query(x).flatten(2)                             # [N, C', HW]
        k = self.key(x).flatten(2)                               # [N, C', HW]
        v = self.value(x).flatten(2)                             # [N, C, HW]
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # [N, HW, HW]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(n, c, h, w)   # [N, C, H, W]
        return x + self.gamma * out


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling (commutes with element-wise ops such as tanh)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling."""
    return F.avg_pool2d(x, 2)


def to_output_range(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Map raw G output to [-1, 1]: ``tanh`` (smooth, default) or ``clamp`` (hard)."""
    if mode == "tanh":
        return torch.tanh(x)
    if mode == "clamp":
        return x.clamp(-1.0, 1.0)
    raise ValueError(f"model.output must be 'tanh' or 'clamp', got {mode!r}")


def check_resolution(name: str, value: int) -> None:
    if value < 4 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 4, got {value}")
