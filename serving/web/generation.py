"""One generation request: latents from the seed (and the upload), images, SSIM, confidence, files.

How an upload seeds generation: the encoder maps the preprocessed upload ``x`` to
``z0 = E(x)``; image ``i`` of a request uses ``z_i = z0 + web.latent_jitter * z_from_seed(seed, n)[i]``,
so the anatomy follows the upload, the chosen condition goes in as the class, and the seed
gives reproducible variety around it. Without an upload ``z_i = z_from_seed(seed, n)[i]``,
exactly what ``radsynth generate`` and the Triton client produce for that seed.

How close the encoder gets: ``G(z0, c)`` for every condition ``c``; the best SSIM against the
upload is reported as the reconstruction's closeness (the condition of the upload is not
known, so each is tried).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import zipfile

import numpy as np

from radsynth.dataset import to_uint8
from radsynth.latent import z_from_seed
from serving.web.backend import Backend, ModelInfo


@dataclasses.dataclass(frozen=True)
class Generated:
    """One generated image and everything the page shows about it."""

    index: int
    image: np.ndarray                          # uint8 [C, H, W]
    png: bytes
    dicom: bytes | None                        # None when synthetic DICOM output is unavailable
    ssim: float | None                         # against the uploaded reference (None: no upload)
    confidence: float | None                   # classifier's probability of the requested condition


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The whole result of one request."""

    condition: str
    seed: int
    n: int
    images: list[Generated]
    z0: np.ndarray | None                      # [z_dim] encoder latent of the upload, if any
    recon_ssim: float | None                   # best SSIM of G(z0, c) to the upload over conditions
    recon_condition: str | None                # the condition that gave it
    recon_png: bytes | None                    # that reconstruction, for the page
    upload_condition: str | None               # what the classifier reads in the upload
    upload_confidence: float | None
    dicom_note: str | None                     # why DICOM download is unavailable, if it is
    classifier_note: str | None                # why confidence is unavailable, if it is
    zip_bytes: bytes


def latents(seed: int, n: int, z_dim: int, z0: np.ndarray | None, jitter: float) -> np.ndarray:
    """``[n, z_dim]`` float32: the seed's latents, centred on ``z0`` (scaled by ``jitter``) when given."""
    noise = z_from_seed(seed, n, z_dim)
    if z0 is None:
        return noise
    return (z0[None, :] + np.float32(jitter) * noise).astype(np.float32)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 ``[C, H, W]`` images of the same size: :mod:`model.ssim`, the evaluation's definition."""
    from model.ssim import ssim_pair

    return ssim_pair(a, b)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) -> PNG file bytes."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_uri(blob: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(blob).decode("ascii")


def dicom_bytes(images: np.ndarray, info: ModelInfo, condition: str, seed: int) -> tuple[list[bytes] | None, str | None]:
    """Synthetic Secondary Capture DICOM files (one new study/series) via ``serving.dicom_out``.

    Args:
        images: uint8 ``[n, C, H, W]``.

    Returns:
        ``(files, None)``, or ``(None, reason)`` when the synthetic-DICOM writer is not installed.
    """
    try:
        from pydicom.uid import generate_uid

        from serving.dicom_out import synthetic_dataset
    except ImportError:
        return None, "DICOM download is unavailable: the synthetic-DICOM writer (serving/dicom_out.py) is not installed"
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for index, image in enumerate(images):
        ds = synthetic_dataset(
            image.transpose(1, 2, 0), model_name=info.name, model_version=info.version, seed=seed,
            condition=condition, index=index, study_uid=study_uid, series_uid=series_uid,
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files, None


def run(
    backend: Backend,
    info: ModelInfo,
    condition: str,
    n: int,
    seed: int,
    jitter: float,
    reference: np.ndarray | None = None,
    z0: np.ndarray | None = None,
) -> Outcome:
    """Generate ``n`` images of ``condition`` for ``seed``, seeded by an upload when given.

    Args:
        backend: the served models.
        info: the served generator's facts.
        condition: a name from ``info.classes``.
        n: number of images.
        seed: latent seed (``radsynth.latent.z_from_seed``).
        jitter: ``web.latent_jitter``.
        reference: uint8 ``[C, R, R]`` preprocessed upload (SSIM reference), or None.
        z0: the upload's encoder latent ``[z_dim]`` when already known (regenerate), or None.

    Raises:
        ServiceUnavailable: a served model cannot answer.
    """
    k = len(info.classes)
    cls = info.classes.index(condition)
    ref_f = None if reference is None else reference[None].astype(np.float32) / 127.5 - 1.0  # [1, C, R, R]
    if reference is not None and z0 is None and info.encoder_ready:
        z0 = backend.encode(ref_f)[0]  # [z_dim]
    z = latents(seed, n, info.z_dim, z0, jitter)  # [n, z_dim]
    c = np.full((n,), cls, dtype=np.int64)
    if z0 is not None:
        z = np.concatenate([z, np.repeat(z0[None], k, axis=0).astype(np.float32)])
        c = np.concatenate([c, np.arange(k, dtype=np.int64)])
    out = to_uint8(backend.generate(z, c))  # [n (+k), C, H, W]
    images, recons = out[:n], out[n:]

    recon_ssim = recon_condition = recon_png = None
    if z0 is not None and reference is not None:
        scores = [ssim(r, reference) for r in recons]
        best = int(np.argmax(scores))
        recon_ssim, recon_condition, recon_png = scores[best], info.classes[best], png_bytes(recons[best])

    probs = upload_probs = None
    classifier_note = None
    if info.classifier_ready:
        batch = images if reference is None else np.concatenate([images, reference[None]])
        p = backend.classify(batch.astype(np.float32) / 127.5 - 1.0)  # [n (+1), K]
        probs, upload_probs = p[:n], (p[n] if reference is not None else None)
    else:
        classifier_note = "the domain classifier is not served, so confidence is unavailable"

    dicoms, dicom_note = dicom_bytes(images, info, condition, seed)
    generated = []
    for i in range(n):
        generated.append(Generated(
            index=i,
            image=images[i],
            png=png_bytes(images[i]),
            dicom=None if dicoms is None else dicoms[i],
            ssim=None if reference is None else ssim(images[i], reference),
            confidence=None if probs is None else float(probs[i, cls]),
        ))
    upload_condition = upload_conf = None
    if upload_probs is not None:
        j = int(np.argmax(upload_probs))
        upload_condition, upload_conf = info.classes[j], float(upload_probs[j])
    outcome = Outcome(
        condition=condition, seed=seed, n=n, images=generated, z0=z0,
        recon_ssim=recon_ssim, recon_condition=recon_condition, recon_png=recon_png,
        upload_condition=upload_condition, upload_confidence=upload_conf,
        dicom_note=dicom_note, classifier_note=classifier_note, zip_bytes=b"",
    )
    return dataclasses.replace(outcome, zip_bytes=zip_bundle(outcome, info))


def file_stem(info: ModelInfo, condition: str, seed: int, index: int) -> str:
    return f"radsynth_{info.name}-v{info.version}_{condition}_seed{seed}_{index:02d}"


def zip_bundle(outcome: Outcome, info: ModelInfo) -> bytes:
    """All images as PNG (+ DICOM when available) and a provenance JSON, in one zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for g in outcome.images:
            stem = file_stem(info, outcome.condition, outcome.seed, g.index)
            zf.writestr(f"{stem}.png", g.png)
            if g.dicom is not None:
                zf.writestr(f"{stem}.dcm", g.dicom)
        zf.writestr("provenance.json", json.dumps({
            "synthetic": True,
            "research_use_only": True,
            "model": info.name, "version": info.version, "alias": info.alias,
            "condition": outcome.condition, "seed": outcome.seed, "n": outcome.n,
            "seeded_by_upload": outcome.z0 is not None,
        }, indent=2) + "\n")
    return buf.getvalue()
