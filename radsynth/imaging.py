"""Decoding and preprocessing of medical images: DICOM by the standard, PNG/JPEG by content.

This module is THE image path of radsynth: ingest uses it on every study of an export and the
web app uses it on an upload, so a user's image is prepared exactly like training data.
DICOM is read by :mod:`radsynth.dicom`, the one guarded reader (capped inflation, header
first, codestream sized before decoding, header values never echoed); its names are
re-exported here.

DICOM pixel pipeline (PS3.3 C.7.6.3, C.11.1, C.11.2)::

    stored values --modality LUT / rescale--> modality values --VOI LUT or window--> [0, 1]
    --MONOCHROME1 inverted--> [0, 1] (0 = black, 1 = white)

* Modality: ``ModalityLUTSequence`` if present, else ``RescaleSlope``/``RescaleIntercept``.
* VOI: the first item of ``VOILUTSequence`` if present (its OW data read in the file's byte
  order), else the first value of ``WindowCenter``/``WindowWidth`` with ``VOILUTFunction``
  (LINEAR, LINEAR_EXACT, SIGMOID). Without either, the full range the stored bits can hold
  (``BitsStored``, signedness from ``PixelRepresentation``, mapped through the modality
  transform) is scaled to [0, 1]: an 8-bit image keeps its 0..255 contrast, and a 12-bit copy
  with a window that covers its range decodes to the same picture.
* Compressed transfer syntaxes (JPEG 2000, JPEG, RLE) decode through pydicom's pixel
  backends (pylibjpeg-openjpeg, Pillow); nothing is downloaded.
* Multi-frame and colour images are rejected with :class:`ImageError` (one 2-D grayscale
  radiograph per study is what the trainer learns from).

PNG/JPEG: the header's size is checked against the pixel cap before anything decodes, and
Pillow's limits on compressed PNG text chunks are lowered (a zTXt chunk can inflate too).

:func:`prepare` is the training preprocessing: centre square crop, then an anti-aliased
area resize, then uint8.
"""

from __future__ import annotations

import io

import numpy as np

from radsynth.dicom import (  # noqa: F401  (re-exported: the one DICOM reader)
    DEFAULT_MAX_PIXELS,
    ImageError,
    Limits,
    dicom_to_array,
    read_dicom,
    read_guarded,
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
PNG_TEXT_CHUNK_BYTES = 256 * 1024              # largest decompressed PNG text chunk Pillow may inflate
PNG_TEXT_TOTAL_BYTES = 1 << 20                 # all text chunks of one PNG together


def _limit_png_text() -> None:
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, PNG_TEXT_CHUNK_BYTES)
    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, PNG_TEXT_TOTAL_BYTES)


# --------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a PNG or JPEG, recognised by content (never by name), to grayscale.

    Grayscale conversion: 8-bit modes scale by 1/255, 16-bit grayscale PNG by 1/65535;
    colour and palette images are converted to luma with ITU-R 601-2 weights
    (Pillow's ``convert("L")``); alpha is ignored. EXIF orientation is applied.

    Args:
        data: the file's bytes.
        max_pixels: largest width x height accepted (decompression-bomb guard).

    Returns:
        float32 ``[H, W]`` in [0, 1].

    Raises:
        ImageError: ``not_image`` (not a PNG/JPEG, or corrupt), ``too_large``.
    """
    from PIL import Image, ImageOps

    _limit_png_text()
    data = bytes(data)
    if data.startswith(_PNG_MAGIC):
        fmt = "PNG"
    elif data.startswith(_JPEG_MAGIC):
        fmt = "JPEG"
    else:
        raise ImageError("not a PNG or JPEG image (checked by content, not by file name)", "not_image")
    # No warnings.catch_warnings here (not thread-safe): the pixel cap is checked from the
    # header before load(), so Pillow's own bomb warning/error only backs it up.
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} pixels, above the limit of {max_pixels}", "too_large")
        img = ImageOps.exif_transpose(img)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image exceeds the decompression-bomb limit of {max_pixels} pixels", "too_large") from None
    except Exception as exc:
        raise ImageError(f"{fmt} data is truncated or corrupt ({type(exc).__name__})", "not_image") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        out = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or out.max() > 255 else 255.0
        out /= np.float32(top)
    elif img.mode == "F":
        out = np.array(img, dtype=np.float32)
    else:
        out = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
    del img
    if out.ndim != 2 or min(out.shape) < 1:
        raise ImageError(f"decoded image has shape {out.shape}, expected [H, W]", "not_image")
    np.clip(out, 0.0, 1.0, out=out)
    return out


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an uploaded file of unknown kind: DICOM (``DICM`` at byte 128), PNG or JPEG.

    Returns:
        float32 ``[H, W]`` in [0, 1], ready for :func:`prepare`.

    Raises:
        ImageError: as :func:`read_dicom` / :func:`dicom_to_array` / :func:`decode_image_bytes`.
    """
    data = bytes(data)
    if data[128:132] == b"DICM":
        limits = Limits(max_pixels=max_pixels)
        return dicom_to_array(read_guarded(data, limits), limits)
    return decode_image_bytes(data, max_pixels=max_pixels)


# --------------------------------------------------------------------------------------
# Training preprocessing
# --------------------------------------------------------------------------------------


def center_crop_square(img: np.ndarray) -> np.ndarray:
    """The largest centred square of ``[H, W]`` (odd margins lose the extra row/column at the end)."""
    h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top : top + side, left : left + side]


def resize_area(img: np.ndarray, resolution: int) -> np.ndarray:
    """Anti-aliased resize of a float ``[S, S]`` to ``[resolution, resolution]``.

    Downscaling averages every source pixel over the area it covers (box filter);
    upscaling is bilinear.
    """
    from PIL import Image

    if img.shape == (resolution, resolution):
        return img.astype(np.float32, copy=False)
    src = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    filt = Image.Resampling.BOX if img.shape[0] >= resolution else Image.Resampling.BILINEAR
    return np.asarray(src.resize((resolution, resolution), resample=filt), dtype=np.float32)


def prepare(img01: np.ndarray, resolution: int, channels: int = 1) -> np.ndarray:
    """THE training preprocessing: [0, 1] image -> uint8 ``[C, res, res]``.

    Quantise to 8 bits, centre square crop (chosen over padding so the generator never
    learns artificial borders; chest radiographs are framed on the thorax), anti-aliased
    area resize, round to uint8. ``channels`` > 1 repeats the gray plane (for 3-channel consumers).

    Args:
        img01: float ``[H, W]`` in [0, 1] (from :func:`dicom_to_array` or
            :func:`decode_image_bytes`).
        resolution: output side in pixels.
        channels: output channels (1 or 3).

    Returns:
        uint8 ``[channels, resolution, resolution]``.
    """
    img01 = np.asarray(img01)
    if img01.ndim != 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {img01.shape}", "colour")
    if resolution < 1 or channels < 1:
        raise ValueError(f"resolution and channels must be positive, got {resolution}, {channels}")
    # Quantise to the 8-bit display grid first: an 8-bit image and its 12-bit windowed copy
    # then prepare to identical arrays, not arrays that round apart after the resize.
    u8 = np.clip(img01, 0.0, 1.0).astype(np.float32, copy=False)  # a new array: the in-place steps below are safe
    u8 *= np.float32(255.0)
    np.rint(u8, out=u8)
    u8 /= np.float32(255.0)
    square = center_crop_square(u8)
    small = resize_area(square, resolution)  # [res, res]
    u8 = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(u8[None], channels, axis=0)  # [C, res, res]


def downsample_levels(images: np.ndarray, levels: list[int]) -> dict[int, np.ndarray]:
    """Area-average uint8 ``[N, C, R, R]`` down to every resolution in ``levels``.

    Each level is the exact mean of ``(R / res)^2`` source pixels (powers of two), rounded.

    Returns:
        ``{res: uint8 [N, C, res, res]}``.
    """
    n, c, r, _ = images.shape
    out = {}
    for res in levels:
        if res == r:
            out[res] = images
            continue
        if r % res:
            raise ValueError(f"level {res} does not divide the resolution {r}")
        k = r // res
        level = np.empty((n, c, res, res), dtype=np.uint8)
        for start in range(0, n, 512):  # bounded memory: 512 images at a time
            blocks = images[start : start + 512].reshape(-1, c, res, k, res, k).astype(np.float32)
            level[start : start + 512] = np.clip(np.rint(blocks.mean(axis=(3, 5))), 0, 255)
        out[res] = level
    return out
