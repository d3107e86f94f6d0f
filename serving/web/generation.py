"""One generation request: latents from the seed (and the upload), images, SSIM, confidence, files.

How an upload seeds generation: the encoder maps the preprocessed upload ``x`` to
``z0 = E(x)``; image ``i`` of a request uses ``z_i = z0 + web.latent_jitter * z_from_seed(seed, n)[i]``,
so the anatomy follows the upload, the chosen condition goes in as the class, and the seed
gives reproducible variety around it. Without an upload ``z_i = z_from_seed(seed, n)[i]``,
exactly what ``radsynth generate`` and the Triton client produce for that seed.

How close the encoder gets: ``G(z0, c)`` for every condition ``c``; the best SSIM against the
upload is reported as the reconstruction's closeness (the condition of the upload is not
known, so each is tried).

The one-seed strip: the request's first latent ``z_0`` with every condition, so a reader sees
what the condition alone changes (the requested condition's tile is image 0).

Downloads are links that regenerate on request (:func:`images`): the same latents and the same
batch as the page (:func:`batch`), so a file is pixel for pixel the image shown.
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
    ssim: float | None                         # against the uploaded reference (None: no upload)
    confidence: float | None                   # classifier's probability of the requested condition


@dataclasses.dataclass(frozen=True)
class StripImage:
    """The request's first latent with one condition (the one-seed strip)."""

    condition: str
    png: bytes


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
    strip: list[StripImage]                    # z_0 with every condition, model class order


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


DICOM_UNAVAILABLE = "DICOM download is unavailable: the synthetic-DICOM writer (serving/dicom_out.py) is not installed"


def dicom_available() -> bool:
    try:
        import serving.dicom_out  # noqa: F401
    except ImportError:
        return False
    return True


def dicom_bytes(images: np.ndarray, info: ModelInfo, condition: str, seed: int, body_part: str = "",
                indices: list[int] | None = None) -> tuple[list[bytes] | None, str | None]:
    """Synthetic Secondary Capture DICOM files (one new study/series) via ``serving.dicom_out``.

    Args:
        images: uint8 ``[n, C, H, W]``.
        body_part: *BodyPartExamined* of the training data ("" when unknown).
        indices: each image's index in the request (default 0..n-1).

    Returns:
        ``(files, None)``, or ``(None, reason)`` when the synthetic-DICOM writer is not installed.
    """
    try:
        from pydicom.uid import generate_uid

        from serving.dicom_out import synthetic_dataset
    except ImportError:
        return None, DICOM_UNAVAILABLE
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for index, image in zip(indices or range(len(images)), images):
        ds = synthetic_dataset(
            image.transpose(1, 2, 0), model_name=info.name, model_version=info.version, seed=seed,
            condition=condition, index=index, study_uid=study_uid, series_uid=series_uid, body_part=body_part,
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    return files, None


def batch(info: ModelInfo, condition: str, n: int, seed: int, jitter: float, z0: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The generator inputs of one request: ``n`` images, then (with an upload) ``G(z0, c)`` for
    every condition, then the one-seed strip (``z_0`` with every condition).

    Returns:
        ``(z [rows, z_dim] float32, class [rows] int64)``.
    """
    k = len(info.classes)
    z = latents(seed, n, info.z_dim, z0, jitter)  # [n, z_dim]
    c = np.full((n,), info.classes.index(condition), dtype=np.int64)
    parts_z, parts_c = [z], [c]
    if z0 is not None:
        parts_z.append(np.repeat(z0[None], k, axis=0).astype(np.float32))
        parts_c.append(np.arange(k, dtype=np.int64))
    parts_z.append(np.repeat(z[:1], k, axis=0))
    parts_c.append(np.arange(k, dtype=np.int64))
    return np.concatenate(parts_z), np.concatenate(parts_c)


def images(backend: Backend, info: ModelInfo, condition: str, n: int, seed: int, jitter: float,
           z0: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` images of a request again (downloads): uint8 ``[n, C, H, W]``, equal to the page's."""
    z, c = batch(info, condition, n, seed, jitter, z0)
    return to_uint8(backend.generate(z, c))[:n]


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
    z, c = batch(info, condition, n, seed, jitter, z0)
    out = to_uint8(backend.generate(z, c))  # [n (+k) + k, C, H, W]
    images, recons, strip = out[:n], out[n:len(out) - k], out[len(out) - k:]

    recon_ssim = recon_condition = recon_png = None
    if z0 is not None and reference is not None:
        scores = [ssim(r, reference) for r in recons]
        best = int(np.argmax(scores))
        recon_ssim, recon_condition, recon_png = scores[best], info.classes[best], png_bytes(recons[best])

    probs = upload_probs = None
    classifier_note = None
    if info.classifier_ready:
        batch_images = images if reference is None else np.concatenate([images, reference[None]])
        p = backend.classify(batch_images.astype(np.float32) / 127.5 - 1.0)  # [n (+1), K]
        probs, upload_probs = p[:n], (p[n] if reference is not None else None)
    else:
        classifier_note = "the domain classifier is not served, so confidence is unavailable"

    generated = []
    for i in range(n):
        generated.append(Generated(
            index=i,
            image=images[i],
            png=png_bytes(images[i]),
            ssim=None if reference is None else ssim(images[i], reference),
            confidence=None if probs is None else float(probs[i, cls]),
        ))
    upload_condition = upload_conf = None
    if upload_probs is not None:
        j = int(np.argmax(upload_probs))
        upload_condition, upload_conf = info.classes[j], float(upload_probs[j])
    return Outcome(
        condition=condition, seed=seed, n=n, images=generated, z0=z0,
        recon_ssim=recon_ssim, recon_condition=recon_condition, recon_png=recon_png,
        upload_condition=upload_condition, upload_confidence=upload_conf,
        dicom_note=None if dicom_available() else DICOM_UNAVAILABLE, classifier_note=classifier_note,
        strip=[StripImage(info.classes[j], png_bytes(strip[j])) for j in range(k)],
    )


def zoom(resolution: int, target: int) -> int:
    """The integer enlargement that brings a ``resolution``-pixel image closest to ``target`` px, at least 1."""
    return max(1, target // max(1, resolution))


def file_stem(info: ModelInfo, condition: str, seed: int, index: int) -> str:
    return f"radsynth_{info.name}-v{info.version}_{condition}_seed{seed}_{index:02d}"


def zip_bundle(images: np.ndarray, info: ModelInfo, condition: str, seed: int, seeded_by_upload: bool,
               body_part: str = "") -> bytes:
    """All images of a request (uint8 ``[n, C, H, W]``) as PNG (+ DICOM when available) and a provenance JSON, in one zip."""
    dicoms, _ = dicom_bytes(images, info, condition, seed, body_part)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, image in enumerate(images):
            stem = file_stem(info, condition, seed, i)
            zf.writestr(f"{stem}.png", png_bytes(image))
            if dicoms is not None:
                zf.writestr(f"{stem}.dcm", dicoms[i])
        zf.writestr("provenance.json", json.dumps({
            "synthetic": True,
            "research_use_only": True,
            "model": info.name, "version": info.version, "alias": info.alias,
            "condition": condition, "seed": seed, "n": int(len(images)),
            "seeded_by_upload": seeded_by_upload,
        }, indent=2) + "\n")
    return buf.getvalue()
