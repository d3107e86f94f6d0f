"""Decoding and preprocessing of medical images: DICOM by the standard, PNG/JPEG by content.

This module is THE image path of radsynth: ingest uses it on every study of an export and the
web app uses it on an upload, so a user's image is prepared exactly like training data.

Pixel pipeline for DICOM (PS3.3 C.7.6.3, C.11.1, C.11.2)::

    stored values --modality LUT / rescale--> modality values --VOI LUT or window--> [0, 1]
    --MONOCHROME1 inverted--> [0, 1] (0 = black, 1 = white)

* Modality: ``ModalityLUTSequence`` if present, else ``RescaleSlope``/``RescaleIntercept``.
* VOI: the first item of ``VOILUTSequence`` if present, else the first value of
  ``WindowCenter``/``WindowWidth`` with ``VOILUTFunction`` (LINEAR, LINEAR_EXACT, SIGMOID).
  Without either, the full range the stored bits can hold (``BitsStored``, signedness from
  ``PixelRepresentation``, mapped through the modality transform) is scaled to [0, 1]: an
  8-bit image keeps its 0..255 contrast, and a 12-bit copy with a window that covers its
  range decodes to the same picture.
* Compressed transfer syntaxes (JPEG 2000, JPEG, RLE) decode through pydicom's pixel
  backends (pylibjpeg-openjpeg, Pillow); nothing is downloaded.
* Multi-frame and colour images are rejected with :class:`ImageError` (one 2-D grayscale
  radiograph per study is what the trainer learns from).

:func:`prepare` is the training preprocessing: centre square crop, then an anti-aliased
area resize, then uint8.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from radsynth.errors import RadsynthError

# Largest image (in pixels) decoded from PNG/JPEG; guards against decompression bombs.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ImageError(RadsynthError, ValueError):
    """An image cannot be used; ``reason`` is a short machine-readable code.

    Codes: ``not_dicom``, ``unreadable``, ``no_pixel_data``, ``multi_frame``, ``colour``,
    ``not_image``, ``too_large``. Messages never carry header values or file paths.
    """

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------


def read_dicom(src: str | Path | bytes, stop_before_pixels: bool = False):
    """Read one DICOM file (path or bytes) into a ``pydicom.Dataset``.

    A file without the ``DICM`` preamble is accepted only when it still parses into an image
    dataset (SOP Class UID and Rows present), as some old exports write them.

    Args:
        src: a path or the file's bytes.
        stop_before_pixels: skip the pixel data (header-only read).

    Returns:
        The dataset, pixel data not yet decoded.

    Raises:
        ImageError: ``not_dicom`` (not a DICOM file), ``unreadable`` (truncated or corrupt
            header), ``no_pixel_data`` (parsed, but there is no image in it).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    def _open():
        return io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else open(src, "rb")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings can quote header values
        try:
            with _open() as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            ds = _read_forced(_open, stop_before_pixels)
        except (OSError, EOFError) as exc:
            if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
                raise ImageError(f"cannot open the file ({type(exc).__name__})", "unreadable") from None
            raise ImageError(f"DICOM file is truncated or corrupt ({type(exc).__name__})", "unreadable") from None
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise ImageError(f"DICOM header cannot be parsed ({type(exc).__name__})", "unreadable") from None
    if len(ds) == 0:
        raise ImageError("DICOM file has no data elements (truncated after the preamble?)", "unreadable")
    if not stop_before_pixels and not _has_pixels(ds):
        if _is_image_object(ds):
            raise ImageError("DICOM image file ends before its pixel data (truncated copy?)", "unreadable")
        raise ImageError("DICOM file has no pixel data (not an image object: report, SR, presentation state?)", "no_pixel_data")
    return ds


def _is_image_object(ds) -> bool:
    """True when the header says this should be an image (so missing pixels mean truncation)."""
    if "Rows" in ds:
        return True
    for uid in (ds.get("SOPClassUID"), getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")):
        try:
            if uid is not None and "Image Storage" in uid.name:
                return True
        except Exception:
            continue
    return False


def _read_forced(open_fn, stop_before_pixels: bool):
    import pydicom

    try:
        with open_fn() as fh:
            ds = pydicom.dcmread(fh, force=True, stop_before_pixels=stop_before_pixels)
        ok = "SOPClassUID" in ds and "Rows" in ds and bool(str(ds.SOPClassUID).strip())
    except Exception:
        ok = False
    if not ok:
        raise ImageError("not a DICOM file (no DICM preamble and no DICOM image header)", "not_dicom")
    return ds


def _has_pixels(ds) -> bool:
    return any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def dicom_to_array(ds) -> np.ndarray:
    """Decode a DICOM image to display intensities following the standard.

    Args:
        ds: a dataset from :func:`read_dicom`.

    Returns:
        float32 ``[H, W]`` in [0, 1]; 0 is black and 1 white whatever the photometric
        interpretation.

    Raises:
        ImageError: ``no_pixel_data``, ``multi_frame`` (one frame per study expected),
            ``colour`` (RGB/YBR/palette), ``unreadable`` (pixel data truncated or the codec
            failed).
    """
    from pydicom.pixels import apply_modality_lut

    if not _has_pixels(ds):
        raise ImageError("DICOM file has no pixel data", "no_pixel_data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(
            f"colour image ({photometric or 'unknown'}, {samples} samples/pixel): radsynth learns grayscale "
            "radiographs; convert it to MONOCHROME2 or drop it from the export",
            "colour",
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageError(
            f"multi-frame image ({frames} frames): radsynth expects one 2-D radiograph per file; "
            "split the frames into single-frame objects",
            "multi_frame",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stored = ds.pixel_array  # [H, W]
        except Exception as exc:
            raise ImageError(_pixel_failure(ds, exc), "unreadable") from None
        if stored.ndim != 2:
            raise ImageError(f"pixel data has shape {stored.shape}, expected one 2-D frame", "multi_frame")
        try:
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        except Exception as exc:
            raise ImageError(f"modality LUT / rescale cannot be applied ({type(exc).__name__})", "unreadable") from None

    out = _apply_voi(values, ds)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _pixel_failure(ds, exc: Exception) -> str:
    try:
        have = len(ds.PixelData)
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_compressed and have < need:
            return f"pixel data truncated: {have} of {need} bytes"
    except Exception:
        pass
    return f"pixel data cannot be decoded ({type(exc).__name__}); check the transfer syntax codecs"


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_range(ds) -> tuple[float, float]:
    """The range of modality values the stored bits can produce."""
    lo, hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        return 0.0, 2.0**out_bits - 1
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def _first(value) -> float:
    """The first of a possibly multi-valued DS (the standard's default choice)."""
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _apply_voi(x: np.ndarray, ds) -> np.ndarray:
    """Modality values -> [0, 1] by VOI LUT, window, or the full modality range."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        data = item.LUTData
        if isinstance(data, (bytes, bytearray)):  # OW: 16-bit entries (8-bit packed in old files)
            packed = len(data) == n and bits <= 8
            lut = np.frombuffer(data, dtype=np.uint8 if packed else "<u2").astype(np.float64)
        else:
            lut = np.asarray(data if isinstance(data, (list, tuple)) else [data], dtype=np.float64)
        lut = lut[:n]
        idx = np.clip(np.rint(x - first), 0, len(lut) - 1).astype(np.int64)
        top = 2.0**bits - 1 if bits else max(float(lut.max()), 1.0)
        return lut[idx] / top
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1e-6)))
        if function == "LINEAR_EXACT":
            return (x - c) / max(w, 1e-6) + 0.5
        if w <= 1:  # LINEAR needs width >= 1 (C.11.2.1.2.1); width 1 is a threshold
            return (x > c - 0.5).astype(np.float64)
        return (x - (c - 0.5)) / (w - 1.0) + 0.5
    lo, hi = _modality_range(ds)
    return (x - lo) / max(hi - lo, 1e-12)


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

    data = bytes(data)
    if data.startswith(_PNG_MAGIC):
        fmt = "PNG"
    elif data.startswith(_JPEG_MAGIC):
        fmt = "JPEG"
    else:
        raise ImageError("not a PNG or JPEG image (checked by content, not by file name)", "not_image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image is {width}x{height} pixels, above the limit of {max_pixels}", "too_large")
            img = ImageOps.exif_transpose(img)
            img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"image exceeds the decompression-bomb limit of {max_pixels} pixels", "too_large") from None
        except Exception as exc:
            raise ImageError(f"{fmt} data is truncated or corrupt ({type(exc).__name__})", "not_image") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        out = arr / top
    elif img.mode == "F":
        out = np.asarray(img, dtype=np.float64)
    else:
        out = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    if out.ndim != 2 or min(out.shape) < 1:
        raise ImageError(f"decoded image has shape {out.shape}, expected [H, W]", "not_image")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an uploaded file of unknown kind: DICOM (``DICM`` at byte 128), PNG or JPEG.

    Returns:
        float32 ``[H, W]`` in [0, 1], ready for :func:`prepare`.

    Raises:
        ImageError: as :func:`read_dicom` / :func:`dicom_to_array` / :func:`decode_image_bytes`.
    """
    data = bytes(data)
    if data[128:132] == b"DICM":
        ds = read_dicom(data)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows * cols > max_pixels:
            raise ImageError(f"image is {cols}x{rows} pixels, above the limit of {max_pixels}", "too_large")
        return dicom_to_array(ds)
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
    u8 = np.rint(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.float32) / 255.0
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
