"""Uploaded reference images: checked by content, decoded in memory, preprocessed as in training.

Every check here runs on the bytes of the request, never on the file name or the browser's
content type. What is accepted:

- PNG or JPEG, single-channel (an RGB image whose three channels are equal counts as grey);
- DICOM Part 10 (``DICM`` after the 128-byte preamble), one frame, MONOCHROME1/2, with pixel data,
  read by :func:`radsynth.dicom.read_guarded`, the same guarded reader ingest uses (a Deflated
  body inflated under a cap, the header checked before any pixel is read, a compressed
  codestream's own size checked against the header and the pixel cap before it is decoded);
- at least the served model's resolution on each side (a 1 x 1 image says nothing), at most
  ``web.max_pixels``.

A DICOM whose modality or body part is not what the model was trained on
(``web.expected_modalities`` / ``web.expected_body_parts``) gets a visible warning on the page,
or a refusal when ``web.off_domain`` is ``refuse``; so does one that declares burned-in
annotation.

Each refusal is an :class:`UploadError` carrying the HTTP status the page answers with
(413 too large, 415 not an image type we read, 422 unreadable or unsuitable content) and a
sentence a user can act on. No message quotes a header value or a decoder's own text (either
can carry a name or an ID). Nothing is written anywhere: the bytes live in the request and
the decoded arrays in the returned :class:`Reference`, which the caller drops after the response.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from radsynth.errors import RadsynthError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
GREY_TOLERANCE = 2                             # max |R-G|, |G-B| (0..255) for "grey stored as RGB"
OFF_DOMAIN_POLICIES = ("warn", "refuse")


class UploadError(RadsynthError):
    """An upload we refuse; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Domain:
    """What the served model was trained on, and what to do with an upload that is not that."""

    modalities: tuple[str, ...] = ("DX", "CR")  # DICOM Modality codes of the training data
    body_parts: tuple[str, ...] = ("CHEST",)   # BodyPartExamined codes
    policy: str = "warn"                       # warn: a visible warning on the page | refuse: 422

    @classmethod
    def from_config(cls, cfg) -> "Domain":
        """From ``params.web`` (``expected_modalities``, ``expected_body_parts``, ``off_domain``)."""
        if cfg.off_domain not in OFF_DOMAIN_POLICIES:
            raise RadsynthError(f"web.off_domain must be one of {', '.join(OFF_DOMAIN_POLICIES)}, got {cfg.off_domain!r}")
        return cls(tuple(m.upper() for m in cfg.expected_modalities), tuple(b.upper() for b in cfg.expected_body_parts),
                   cfg.off_domain)


@dataclasses.dataclass(frozen=True)
class Reference:
    """A decoded, preprocessed upload (in memory only)."""

    kind: str                                  # "PNG" | "JPEG" | "DICOM"
    width: int                                 # original size, pixels
    height: int
    image: np.ndarray                          # uint8 [C, R, R], exactly the training preprocessing
    warnings: tuple[str, ...] = ()             # shown on the page (off-domain input, burned-in annotation)

    def as_float(self) -> np.ndarray:
        """float32 ``[1, C, R, R]`` in [-1, 1], the generator's range."""
        return self.image[None].astype(np.float32) / 127.5 - 1.0


def sniff(data: bytes) -> str:
    """The format named by the content's magic bytes.

    Raises:
        UploadError: 415 when the bytes are none of PNG, JPEG, DICOM.
    """
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "DICOM"
    if _headerless_dicom(data):
        return "DICOM"
    raise UploadError(
        "This file is not a PNG, JPEG or DICOM image (checked by its content, not its name). "
        "Upload a chest radiograph as PNG, JPEG or DICOM.",
        status=415,
    )


def _headerless_dicom(data: bytes) -> bool:
    """True for an old-style DICOM without preamble that still parses into an image header."""
    from radsynth import dicom

    if len(data) < 132:
        return False
    try:
        dicom.read_dicom(data, stop_before_pixels=True, limits=dicom.Limits(max_bytes=len(data)))
    except dicom.ImageError:
        return False
    return True


STATUS_BY_REASON = {"too_large": 413, "not_dicom": 415, "unsupported": 415, "not_image": 422}


def _from_image_error(exc, what: str) -> UploadError:
    """Map :class:`radsynth.dicom.ImageError` (messages free of header values) to a page message and status."""
    reason = getattr(exc, "reason", "unreadable")
    return UploadError(f"{what}: {exc}.", status=STATUS_BY_REASON.get(reason, 422))


def read_upload(data: bytes, *, max_bytes: int, max_pixels: int, resolution: int, channels: int = 1,
                domain: Domain | None = None, max_inflated_bytes: int = 0) -> Reference:
    """Validate and preprocess one uploaded image, in memory.

    Args:
        data: the uploaded bytes.
        max_bytes: size cap (``web.max_upload_bytes``).
        max_pixels: decoded width*height cap (``web.max_pixels``), checked from the header (and a
            compressed DICOM's codestream) before any pixel is decoded, so a bomb never expands.
        resolution: the served model's ``img_resolution``: the smallest side accepted.
        channels: the served model's ``img_channels``.
        domain: the training domain (default :class:`Domain`, policy ``warn``).
        max_inflated_bytes: cap on a Deflated DICOM's inflated body (0: 2 bytes x ``max_pixels`` + 1 MiB).

    Returns:
        The :class:`Reference` with the training-identical preprocessed image.

    Raises:
        UploadError: with a 4xx status and a user-facing sentence.
    """
    domain = domain or Domain()
    if not data:
        raise UploadError("The uploaded file is empty.", status=422)
    if len(data) > max_bytes:
        raise UploadError(f"The file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB.", status=413)
    kind = sniff(data)
    notes: tuple[str, ...] = ()
    if kind == "DICOM":
        img01, (h, w), notes = _decode_dicom(data, max_pixels, resolution, domain, max_inflated_bytes)
    else:
        img01, (h, w) = _decode_raster(data, kind, max_pixels, resolution)
    from radsynth import imaging

    try:
        prepared = imaging.prepare(img01, resolution, channels)  # uint8 [C, R, R]
    except imaging.ImageError as exc:
        raise _from_image_error(exc, "The image could not be preprocessed") from None
    return Reference(kind=kind, width=w, height=h, image=prepared, warnings=notes)


def _too_many_pixels(w: int, h: int, max_pixels: int) -> UploadError:
    return UploadError(
        f"The image is {w} x {h} = {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:.1f} megapixels. "
        "Downscale it and upload again.",
        status=413,
    )


def _too_small(w: int, h: int, resolution: int) -> UploadError:
    return UploadError(
        f"The image is {w} x {h} pixels, smaller than the model's {resolution} x {resolution}: an image below the "
        "model's resolution says nothing about the anatomy. Upload the original radiograph.",
        status=422,
    )


def _size_error(exc, max_pixels: int, resolution: int) -> UploadError | None:
    size = getattr(exc, "size", None)
    if size and exc.reason == "too_large":
        return _too_many_pixels(*size, max_pixels)
    if size and exc.reason == "too_small":
        return _too_small(*size, resolution)
    return None


def _decode_raster(data: bytes, kind: str, max_pixels: int, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG -> float32 [H, W] in [0, 1], refusing bombs, tiny images, truncation and colour."""
    from PIL import Image

    from radsynth import imaging

    imaging._limit_png_text()
    try:
        # Image.open reads only the header; the pixel cap and floor are checked before anything decodes.
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format != kind:
                raise UploadError(f"The file starts like a {kind} but is not a readable {kind} image.", status=422)
            if w * h > max_pixels:
                raise _too_many_pixels(w, h, max_pixels)
            if min(w, h) < resolution:
                raise _too_small(w, h, resolution)
            if getattr(im, "n_frames", 1) > 1:
                raise UploadError("This is an animated / multi-frame image; upload a single still image.", status=422)
            im.load()
            _refuse_colour(im)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError("The image declares an enormous pixel count (a decompression bomb); it was not opened.", status=413) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(f"The {kind} file is truncated or corrupt and cannot be decoded ({type(exc).__name__}).", status=422) from None
    try:
        img01 = imaging.decode_image_bytes(data, max_pixels=max_pixels)
    except imaging.ImageError as exc:
        raise _from_image_error(exc, f"The {kind} image could not be decoded") from None
    return np.asarray(img01, dtype=np.float32), (h, w)


def _refuse_colour(im) -> None:
    """Raise 422 for a colour raster; grey stored as RGB/palette is accepted."""
    if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        return
    rgb = np.asarray(im.convert("RGB"), dtype=np.int16)  # [H, W, 3]
    spread = max(int(np.abs(rgb[..., 0] - rgb[..., 1]).max()), int(np.abs(rgb[..., 1] - rgb[..., 2]).max()))
    if spread > GREY_TOLERANCE:
        raise UploadError(
            "This is a colour image; the model works on greyscale radiographs. Upload the original greyscale image.",
            status=422,
        )


def off_domain(header, domain: Domain) -> list[str]:
    """What a DICOM header says that is not the training domain, as phrases ("modality MR").

    Only standard codes are quoted (:mod:`radsynth.dicom` maps anything else to
    "unrecognised value"); a missing code is not off-domain (many exports leave body part empty).
    """
    from radsynth.dicom import MISSING, UNRECOGNISED

    found = []
    if domain.modalities and header.modality != MISSING and header.modality not in domain.modalities:
        found.append("a modality that is not a standard DICOM code" if header.modality == UNRECOGNISED
                     else f"modality {header.modality}")
    if domain.body_parts and header.body_part != MISSING and header.body_part not in domain.body_parts:
        found.append("a body part that is not a standard DICOM code" if header.body_part == UNRECOGNISED
                     else f"body part {header.body_part}")
    return found


def _trained(domain: Domain) -> str:
    return f"{'/'.join(domain.modalities)} {'/'.join(domain.body_parts).lower()} images"


def domain_notes(header, domain: Domain) -> tuple[str, ...]:
    """Warnings for the page: off-domain input, declared burned-in annotation."""
    notes = []
    found = off_domain(header, domain)
    if found:
        notes.append(f"This DICOM file says {' and '.join(found)}, but the model was trained on {_trained(domain)}: "
                     "the generated images, their SSIM to it and the classifier's reading of it mean nothing for this image.")
    if header.burned_in == "YES":
        notes.append("This DICOM file declares burned-in annotation: text such as a name or date may be part of the "
                     "pixels shown below. Nothing is kept on the server.")
    return tuple(notes)


def _decode_dicom(data: bytes, max_pixels: int, resolution: int, domain: Domain,
                  max_inflated_bytes: int) -> tuple[np.ndarray, tuple[int, int], tuple[str, ...]]:
    """DICOM -> float32 [H, W] in [0, 1] through the guarded reader (header dropped after the checks)."""
    from radsynth import dicom

    limits = dicom.Limits(max_pixels=max_pixels, min_side=resolution, max_bytes=len(data),
                          max_inflated_bytes=max_inflated_bytes)
    try:
        checked = dicom.read_guarded(data, limits)
    except dicom.ImageError as exc:
        raise (_size_error(exc, max_pixels, resolution) or _from_image_error(exc, "The DICOM file cannot be used")) from None
    header = checked.header
    found = off_domain(header, domain)
    if found and domain.policy == "refuse":
        raise UploadError(f"This DICOM file says {' and '.join(found)}, but the model was trained on {_trained(domain)}, "
                          "so it is refused here (web.off_domain: refuse). Upload an image of what the model was trained on.",
                          status=422)
    notes = domain_notes(header, domain)
    try:
        img01 = dicom.dicom_to_array(checked, limits)   # its checked header is reused
    except dicom.ImageError as exc:
        raise _from_image_error(exc, "The DICOM pixels cannot be decoded") from None
    except Exception as exc:  # a codec failing in a way the reader did not foresee
        raise UploadError(f"The DICOM pixel data is truncated or in a form we cannot decode ({type(exc).__name__}).", status=422) from None
    del checked
    if img01.ndim != 2:
        raise UploadError("This DICOM image is not a single greyscale plane.", status=422)
    return img01, (header.rows, header.columns), notes
