"""Uploaded reference images: checked by content, decoded in memory, preprocessed as in training.

Every check here runs on the bytes of the request, never on the file name or the browser's
content type. What is accepted:

- PNG or JPEG, single-channel (an RGB image whose three channels are equal counts as grey);
- DICOM Part 10 (``DICM`` after the 128-byte preamble), one frame, MONOCHROME1/2, with pixel data.

Each refusal is an :class:`UploadError` carrying the HTTP status the page answers with
(413 too large, 415 not an image type we read, 422 unreadable or unsuitable content) and a
sentence a user can act on. Nothing is written anywhere: the bytes live in the request and
the decoded arrays in the returned :class:`Reference`, which the caller drops after the response.
DICOM is read and decoded by :mod:`radsynth.imaging`, the same code ingest runs on training
data (modality LUT, VOI/window, MONOCHROME1); only the pixels go further, so no header value
(name, ID, date, UID) reaches the page, logs or disk: the header is dropped with the request.
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


class UploadError(RadsynthError):
    """An upload we refuse; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Reference:
    """A decoded, preprocessed upload (in memory only)."""

    kind: str                                  # "PNG" | "JPEG" | "DICOM"
    width: int                                 # original size, pixels
    height: int
    image: np.ndarray                          # uint8 [C, R, R], exactly the training preprocessing

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
    from radsynth import imaging

    if len(data) < 132:
        return False
    try:
        imaging.read_dicom(data, stop_before_pixels=True)
    except imaging.ImageError:
        return False
    return True


STATUS_BY_REASON = {"too_large": 413, "not_dicom": 415, "not_image": 422}


def _from_image_error(exc, what: str) -> UploadError:
    """Map :class:`radsynth.imaging.ImageError` to a page message and status."""
    reason = getattr(exc, "reason", "unreadable")
    return UploadError(f"{what}: {exc}.", status=STATUS_BY_REASON.get(reason, 422))


def read_upload(data: bytes, *, max_bytes: int, max_pixels: int, resolution: int, channels: int = 1) -> Reference:
    """Validate and preprocess one uploaded image, in memory.

    Args:
        data: the uploaded bytes.
        max_bytes: size cap (``web.max_upload_bytes``).
        max_pixels: decoded width*height cap (``web.max_pixels``), checked from the header
            before any pixel is decoded, so a decompression bomb never expands.
        resolution: the served model's ``img_resolution``.
        channels: the served model's ``img_channels``.

    Returns:
        The :class:`Reference` with the training-identical preprocessed image.

    Raises:
        UploadError: with a 4xx status and a user-facing sentence.
    """
    if not data:
        raise UploadError("The uploaded file is empty.", status=422)
    if len(data) > max_bytes:
        raise UploadError(f"The file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB.", status=413)
    kind = sniff(data)
    if kind == "DICOM":
        img01, (h, w) = _decode_dicom(data, max_pixels)
    else:
        img01, (h, w) = _decode_raster(data, kind, max_pixels)
    from radsynth import imaging

    try:
        prepared = imaging.prepare(img01, resolution, channels)  # uint8 [C, R, R]
    except imaging.ImageError as exc:
        raise _from_image_error(exc, "The image could not be preprocessed") from None
    return Reference(kind=kind, width=w, height=h, image=prepared)


def _too_many_pixels(w: int, h: int, max_pixels: int) -> UploadError:
    return UploadError(
        f"The image is {w} x {h} = {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:.1f} megapixels. "
        "Downscale it and upload again.",
        status=413,
    )


def _decode_raster(data: bytes, kind: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG -> float32 [H, W] in [0, 1], refusing bombs, truncation and colour."""
    from PIL import Image

    from radsynth import imaging

    try:
        # Image.open reads only the header; the pixel cap is checked before anything decodes.
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if im.format != kind:
                raise UploadError(f"The file starts like a {kind} but is not a readable {kind} image.", status=422)
            if w * h > max_pixels:
                raise _too_many_pixels(w, h, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                raise UploadError("This is an animated / multi-frame image; upload a single still image.", status=422)
            im.load()
            _refuse_colour(im)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError("The image declares an enormous pixel count (a decompression bomb); it was not opened.", status=413) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(f"The {kind} file is truncated or corrupt and cannot be decoded ({_short(exc)}).", status=422) from None
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


def _decode_dicom(data: bytes, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """DICOM -> float32 [H, W] in [0, 1] through the ingest decoder (de-identified on read)."""
    from radsynth import imaging

    try:
        ds = imaging.read_dicom(data)
    except imaging.ImageError as exc:
        raise _from_image_error(exc, "The DICOM file cannot be used") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UploadError("This DICOM file has no pixel data (it may be a report or structured document).", status=422)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UploadError(f"This DICOM file has {frames} frames; upload a single-frame radiograph.", status=422)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise UploadError(
            f"This DICOM image is colour ({photometric}); the model works on greyscale (MONOCHROME) radiographs.",
            status=422,
        )
    h, w = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if h <= 0 or w <= 0:
        raise UploadError("This DICOM file does not say how many rows and columns its image has.", status=422)
    if h * w > max_pixels:
        raise _too_many_pixels(w, h, max_pixels)
    try:
        img01 = imaging.dicom_to_array(ds)
    except imaging.ImageError as exc:
        raise _from_image_error(exc, "The DICOM pixels cannot be decoded") from None
    except Exception as exc:  # truncated pixel data, unsupported transfer syntax, ...
        raise UploadError(f"The DICOM pixel data is truncated or in a form we cannot decode ({_short(exc)}).", status=422) from None
    img01 = np.asarray(img01, dtype=np.float32)
    if img01.ndim != 2:
        raise UploadError("This DICOM image is not a single greyscale plane.", status=422)
    return img01, (h, w)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
