"""The image -> z encoder ``E`` trained after the GAN, so an upload can seed generation.

``E`` maps a preprocessed radiograph ``x`` (``[N, C, R, R]`` in [-1, 1]) to a latent
``z = E(x)`` (``[N, z_dim]``) such that ``G_ema(E(x), c)`` reconstructs ``x`` when ``c`` is
the image's own condition. ``G_ema`` is frozen; the loss is

    ||G_ema(E(x), c) - x||^2  +  prior_weight * mean(E(x)^2)

on the training split, the second term keeping codes where ``z_from_seed`` draws them (a
standard normal), so ``E(x) + jitter * z_from_seed(seed)`` stays on the generator's manifold.
``E`` is class-agnostic: swapping ``c`` afterwards keeps the anatomy and changes the condition.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from radsynth.config import WebConfig


class Encoder(nn.Module):
    """Convolutional encoder: ``[N, C, R, R]`` -> ``[N, z_dim]``.

    Args:
        z_dim: latent size of the generator it inverts.
        img_resolution: input side (power of two, >= 4).
        img_channels: input channels.
        channels: width of the first conv; doubles at each halving, capped at 8x.
    """

    def __init__(self, z_dim: int, img_resolution: int, img_channels: int, channels: int = 64):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.z_dim = int(z_dim)                # latent size
        self.img_resolution = int(img_resolution)  # input side
        self.img_channels = int(img_channels)  # input channels
        self.channels = int(channels)          # first conv width
        layers: list[nn.Module] = [nn.Conv2d(img_channels, channels, 3, padding=1), nn.LeakyReLU(0.2)]
        res, ch = img_resolution, channels
        while res > 4:
            out = min(ch * 2, channels * 8)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            res, ch = res // 2, out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch * 4 * 4, z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # [N, ch, 4, 4]
        return self.head(h.flatten(1))  # [N, z_dim]


@dataclasses.dataclass(frozen=True)
class ReconstructionReport:
    """How well ``G_ema(E(x), c)`` reproduces held-out images."""

    mse: float                                 # mean squared error in [-1, 1] units
    ssim: float                                # mean SSIM (data range 2)
    ssim_random_z: float                       # same images against G(random z, c): the baseline E must beat
    num_images: int


def _batches(n: int, batch: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    for _ in range(steps):
        yield rng.integers(0, n, size=min(batch, n))


def train_encoder(
    G: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: WebConfig,
    seed: int,
    progress: bool = True,
) -> tuple[Encoder, list[float]]:
    """Train ``E`` so that ``G(E(x), c) ~ x`` with ``G`` frozen.

    Args:
        G: the trained ``G_ema`` at full resolution (``G(z, c) -> [N, C, R, R]``).
        images: uint8 ``[N, C, R, R]`` training split at ``G.img_resolution``.
        labels: int64 ``[N]`` their condition indices.
        cfg: the ``encoder`` section (``steps``, ``batch``, ``lr``, ``prior_weight``, ``channels``).
        seed: makes the run reproducible (init and batch order).
        progress: show a progress bar.

    Returns:
        ``(E, losses)``: the trained encoder in eval mode, on G's device, and the loss per step.
    """
    from tqdm import tqdm

    if images.ndim != 4 or images.shape[-1] != G.img_resolution:
        raise ValueError(f"images must be [N, C, {G.img_resolution}, {G.img_resolution}], got {images.shape}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    G.eval().requires_grad_(False)
    device = next(G.parameters()).device
    E = Encoder(G.z_dim, G.img_resolution, G.img_channels, cfg.channels).to(device)
    opt = torch.optim.Adam(E.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    c_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    losses = []
    bar = tqdm(_batches(len(x_all), cfg.batch, cfg.steps, rng), total=cfg.steps,
               desc="encoder", unit="step", disable=not progress, leave=False)
    for idx in bar:
        ix = torch.from_numpy(idx)
        x = x_all[ix].to(device).float() / 127.5 - 1.0  # [B, C, R, R]
        c = c_all[ix].to(device)
        z = E(x)  # [B, z_dim]
        loss = F.mse_loss(G(z, c), x) + cfg.prior_weight * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return E.eval(), losses


@torch.no_grad()
def reconstruction_report(E: nn.Module, G: nn.Module, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> ReconstructionReport:
    """MSE and SSIM (:mod:`model.ssim`, the evaluation's definition) of ``G(E(x), c)`` against ``x``
    on held-out images, with a random-z baseline."""
    from model.ssim import ssim
    from radsynth.latent import z_from_seed

    device = next(G.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images)).float().to(device) / 127.5 - 1.0  # [N, C, R, R]
    c = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    recon = torch.cat([G(E(x[i:i + 64]), c[i:i + 64]) for i in range(0, len(x), 64)]).cpu()
    z_rand = torch.from_numpy(z_from_seed(seed, len(x), G.z_dim)).to(device)
    rand = torch.cat([G(z_rand[i:i + 64], c[i:i + 64]) for i in range(0, len(x), 64)]).cpu()
    x = x.cpu()

    def mean_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.mean(ssim(a.clamp(-1, 1).numpy(), b.numpy())))

    return ReconstructionReport(
        mse=float(F.mse_loss(recon, x)),
        ssim=mean_ssim(recon, x),
        ssim_random_z=mean_ssim(rand, x),
        num_images=int(len(x)),
    )


def export_onnx(E: Encoder, path: str | Path, metadata: dict[str, str], opset: int) -> Path:
    """Write ``E`` as ONNX: input ``image`` [N, C, R, R] float32, output ``z`` [N, z_dim], dynamic batch.

    The file is checked with ``onnx.checker`` and its output compared with PyTorch
    (max abs diff <= 1e-4) before it is moved into place.

    Args:
        E: the trained encoder.
        path: target ``.onnx`` path (written atomically).
        metadata: string ``metadata_props`` to embed (z_dim, img_resolution, ...).
        opset: ONNX opset.

    Returns:
        The path.
    """
    import onnx
    import onnxruntime as ort

    from radsynth.io import atomic_path

    E = E.eval().cpu()
    dummy = torch.zeros(2, E.img_channels, E.img_resolution, E.img_resolution)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                E, (dummy,), str(tmp), input_names=["image"], output_names=["z"],
                dynamic_axes={"image": {0: "N"}, "z": {0: "N"}}, opset_version=opset, dynamo=False,
            )
        model = onnx.load(str(tmp))
        for key, value in metadata.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = str(key), str(value)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        probe = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, *dummy.shape[1:])).astype(np.float32))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = sess.run(["z"], {"image": probe.numpy()})[0]
        with torch.no_grad():
            want = E(probe).numpy()
        diff = float(np.abs(got - want).max())
        if diff > 1e-4:
            raise RuntimeError(f"encoder ONNX differs from PyTorch by {diff:.2e} (> 1e-4); not written")
    return Path(path)
