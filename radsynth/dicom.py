"""The one guarded DICOM reader: ingest (every study of an export) and the web app (every
upload) read DICOM through this module and nothing else.

A DICOM file is untrusted input. The order of work makes a hostile file cost bounded memory
and time, and keeps every header value out of messages, logs and outputs:

1. **Bytes, capped.** A path is ``stat``-ed before it is read (``Limits.max_bytes``).
2. **File meta only.** A *Deflated* body (transfer syntax 1.2.840.10008.1.2.1.99) is inflated
   here, with a cap (``Limits.inflated_cap``): never by pydicom, which inflates without one
   (a 300 KiB file can hold 300 MiB of zeros).
3. **Header only** (``stop_before_pixels``). Every value the checks need is parsed by a
   helper that never puts the value in its message (:func:`header_int`, :func:`header_code`):
   a patient name in *Number of Frames* gives "not a whole number", not the name.
   Frames, samples, photometric interpretation, bits, ``Rows x Columns`` (against the pixel
   cap and the model's resolution as a floor) are checked before any pixel is read.
4. **The codestream's own size.** For a compressed transfer syntax the first bytes of the
   frame (JPEG 2000 ``SIZ``, JPEG/JPEG-LS ``SOF``, the RLE header) are parsed and must agree
   with ``Rows``/``Columns`` and the cap; a 950-byte file whose header says 16 x 16 around an
   8192 x 8192 codestream is refused before a decoder sees it.
5. Only then is anything decoded (:func:`dicom_to_array`).

Each file is parsed once: its file meta is read once (step 2 decides from it, and the dataset
is built on it), and the header dataset of step 3 goes on from where it stopped to read the
Pixel Data element (and anything after it) once step 3's checks have passed, so steps 3-5 work
on one dataset rather than a header-only parse followed by a full second parse.

pydicom reports odd values through the ``pydicom`` logger and ``warnings.warn``, quoting the
value. Its logger is set to drop everything, and warnings attributed to pydicom (or to this
module's calls into it) are ignored through ``warnings.filters``: both are process-wide
settings made once, idempotently, so no thread toggles them (``warnings.catch_warnings`` is
not thread-safe under gunicorn's threads and is not used).

Messages of :class:`ImageError` carry sizes, counts and standard codes only (a code is
echoed only when it is one of the standard's defined terms), never header text or paths.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from radsynth.errors import RadsynthError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024          # largest Rows x Columns decoded by default
DEFAULT_MAX_BYTES = 1 << 30                    # largest DICOM file read by default (1 GiB)
HEADER_ALLOWANCE = 1 << 20                     # room for non-pixel elements in an inflated body
INFLATE_CHUNK = 1 << 20                        # inflation step: the most a refused bomb holds at once
DEFLATED = "1.2.840.10008.1.2.1.99"

# Transfer syntaxes whose codestream this module can size before decoding.
JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
            "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
RLE = "1.2.840.10008.1.2.5"

# Defined terms (PS3.3 C.7.3.1.1.1, C.7.6.3.1.2, PS3.16 CID 4031): only these are ever echoed.
MODALITIES = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR "
    "M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN "
    "RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC".split())
BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST BRONCHUS BUTTOCK CALCANEUS "
    "CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA "
    "CSPINE CTSPINE DUODENUM EAR ELBOW ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT GALLBLADDER HAND HEAD "
    "HEADNECK HEART HIP HUMERUS ILEUM ILIUM IAC JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG MAXILLA "
    "MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS PAROTID PATELLA PELVIS "
    "PENIS PHARYNX PROSTATE RADIUS RECTUM RIB SACRUM SCALP SCAPULA SCLERA SCROTUM SHOULDER SKULL SPINE SPLEEN SSPINE "
    "STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THUMB THYMUS THYROID TIBIA TOE TONGUE TRACHEA TSPINE TLSPINE ULNA "
    "URETER URETHRA UTERUS VAGINA VULVA WHOLEBODY WRIST ZYGOMA".split())
PHOTOMETRIC = frozenset(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                         "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK"))
YES_NO = frozenset(("YES", "NO"))
MISSING, UNRECOGNISED = "missing", "unrecognised value"


class ImageError(RadsynthError, ValueError):
    """An image cannot be used; ``reason`` is a short machine-readable code.

    Codes: ``not_dicom``, ``unreadable``, ``no_pixel_data``, ``multi_frame``, ``colour``,
    ``not_image``, ``too_large``, ``too_small``, ``inconsistent`` (the codestream disagrees
    with the header), ``unsupported`` (a compression this reader cannot size or decode).
    Messages never carry header values or file paths.
    """

    def __init__(self, message: str, reason: str = "unreadable", size: tuple[int, int] | None = None):
        super().__init__(message)
        self.reason = reason
        self.size = size                       # (width, height) for too_large / too_small, when known


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one read may cost."""

    max_pixels: int = DEFAULT_MAX_PIXELS       # Rows x Columns cap (and the codestream's)
    min_side: int = 1                          # smallest Rows and Columns accepted (the model's resolution)
    max_bytes: int = DEFAULT_MAX_BYTES         # file size cap
    max_inflated_bytes: int = 0                # cap on an inflated Deflated body; 0: 2 bytes x max_pixels + 1 MiB

    @property
    def inflated_cap(self) -> int:
        return self.max_inflated_bytes or 2 * self.max_pixels + HEADER_ALLOWANCE


@dataclasses.dataclass(frozen=True)
class Header:
    """The facts the checks read from a header, each parsed safely (codes: defined terms only)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    photometric: str                           # a defined term, "missing" or "unrecognised value"
    modality: str
    body_part: str
    burned_in: str                             # BurnedInAnnotation (0028,0301): YES | NO | missing | unrecognised
    transfer_syntax: str                       # the UID of a standard transfer syntax, else "private"
    compressed: bool
    deflated: bool                             # the file's body was Deflated (inflated here under the cap)


@dataclasses.dataclass(frozen=True)
class DicomFile:
    """A header-checked DICOM file: its dataset (pixels not decoded) and its :class:`Header`."""

    ds: Any                                    # pydicom.FileDataset
    header: Header


# --------------------------------------------------------------------------------------
# Quiet pydicom (its messages quote header values)
# --------------------------------------------------------------------------------------

_QUIET_LOCK = threading.Lock()
_QUIET_FILTERS = (r"pydicom(\..*)?$", r"radsynth\.dicom$")


def quiet_pydicom() -> None:
    """Drop pydicom's log records and warnings, process-wide and idempotently (thread-safe).

    Called before every read: a test harness or a library may reset ``warnings.filters``, so
    the filters are re-inserted when missing instead of trusted to persist.
    """
    logger = logging.getLogger("pydicom")
    with _QUIET_LOCK:
        if logger.level <= logging.CRITICAL or logger.propagate:
            logger.setLevel(logging.CRITICAL + 1)
            logger.propagate = False
            if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
                logger.addHandler(logging.NullHandler())
        present = {(f[0], getattr(f[3], "pattern", None)) for f in warnings.filters}
        for pattern in _QUIET_FILTERS:
            if ("ignore", pattern) not in present:
                warnings.filterwarnings("ignore", module=pattern)


# --------------------------------------------------------------------------------------
# Safe header values
# --------------------------------------------------------------------------------------


def header_int(ds, keyword: str, default: int | None = None) -> int | None:
    """``ds.<keyword>`` as an int, or ``default`` when absent/empty.

    Raises:
        ImageError: ``unreadable`` when present but not one whole number; the message names
            the attribute, never its value.
    """
    try:
        if keyword not in ds:
            return default
        value = ds[keyword].value
    except Exception:
        raise ImageError(f"the header's {keyword} cannot be read", "unreadable") from None
    if value is None or value == "" or value == b"":
        return default
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) != 1:
            raise ImageError(f"the header's {keyword} holds {len(value)} values, expected one", "unreadable")
        value = value[0]
    try:
        number = float(value)
        if not np.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise ImageError(f"the header's {keyword} is not a whole number", "unreadable") from None


def header_code(ds, keyword: str, known: frozenset[str] | set[str]) -> str:
    """A code string (CS) from the header if it is one of ``known``; else "missing" or "unrecognised value"."""
    try:
        value = ds.get(keyword)
    except Exception:
        return UNRECOGNISED
    if value is None:
        return MISSING
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else ""
        text = str(value).strip().upper()
    except Exception:
        return UNRECOGNISED
    if not text:
        return MISSING
    return text if text in known else UNRECOGNISED


def header_text(ds, keyword: str) -> str:
    """A header string for internal use only (e.g. the ID a pseudonym is made from); "" when
    absent or unreadable. Never put the result in a message."""
    try:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception:
        return ""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _load_bytes(src: str | os.PathLike | bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        try:
            size = os.stat(src).st_size
            if size > max_bytes:
                raise ImageError(f"file is {size / 2**20:.1f} MiB, above the {max_bytes / 2**20:.0f} MiB limit", "too_large")
            with open(src, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError(f"cannot open the file ({type(exc).__name__})", "unreadable") from None
    if len(data) > max_bytes:
        raise ImageError(f"file is {len(data) / 2**20:.1f} MiB, above the {max_bytes / 2**20:.0f} MiB limit", "too_large")
    return data


def _read_meta(data: bytes):
    """``(file_meta, offset of the body, preamble found)``, reading the file meta ONCE.

    ``file_meta`` is ``None`` when a file without the ``DICM`` preamble starts with group 0002
    elements that cannot be parsed (pydicom's forced read fails the same way: not DICOM).
    """
    from pydicom.filereader import _read_file_meta_info

    start = 132 if data[128:132] == b"DICM" else 0
    fp = io.BytesIO(data)
    fp.seek(start)
    try:
        meta = _read_file_meta_info(fp)
    except Exception:
        if start:
            raise ImageError("DICOM file meta information cannot be parsed", "unreadable") from None
        return None, 0, False
    return meta, fp.tell(), bool(start)


def _meta(data: bytes):
    """``(file_meta, offset of the body)``; file_meta is empty for a file without one."""
    from pydicom.dataset import FileMetaDataset

    meta, body_at, _ = _read_meta(data)
    return (FileMetaDataset(), 0) if meta is None else (meta, body_at)


def _inflated_chunks(body: bytes, cap: int, keep: bool) -> tuple[int, list[bytes]]:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunks, data = 0, [], body
    try:
        while True:
            out = d.decompress(data, INFLATE_CHUNK)
            total += len(out)
            if total > cap:
                raise ImageError(f"the Deflated DICOM body inflates past the {cap / 2**20:.0f} MiB limit "
                                 "(a compression bomb, or an image above the pixel cap); it was not inflated further",
                                 "too_large")
            if keep:
                chunks.append(out)
            data = d.unconsumed_tail
            if not data or d.eof:
                break
        tail = d.flush()
    except zlib.error:
        raise ImageError("the Deflated DICOM body is corrupt", "unreadable") from None
    total += len(tail)
    if total > cap:
        raise ImageError(f"the Deflated DICOM body inflates past the {cap / 2**20:.0f} MiB limit", "too_large")
    if not d.eof:
        raise ImageError("the Deflated DICOM body is truncated", "unreadable")
    if keep:
        chunks.append(tail)
    return total, chunks


def inflate(body: bytes, cap: int, prefix: bytes = b"") -> bytes:
    """``prefix`` + the raw-deflate ``body`` inflated, refusing to produce more than ``cap`` bytes.

    A first pass only counts (memory: one 1 MiB chunk), so a bomb is refused at the cost of
    inflating it once into nothing; only a body within the cap is inflated again and kept.

    Raises:
        ImageError: ``too_large`` past the cap, ``unreadable`` for a corrupt or truncated stream.
    """
    _inflated_chunks(body, cap, keep=False)
    _, chunks = _inflated_chunks(body, cap, keep=True)
    return b"".join([prefix, *chunks])


@dataclasses.dataclass
class _Body:
    """A file's bytes ready to parse: the file meta (read once) and where the dataset starts."""

    data: bytes                                # the file, or an inflated Deflated body
    meta: Any                                  # FileMetaDataset, or None (unparseable meta, no preamble)
    body_at: int                               # offset of the dataset in ``data``
    preamble: bytes | None                     # the 128-byte preamble; None without ``DICM``
    deflated: bool


def _plain_body(data: bytes, limits: Limits) -> _Body:
    """The file meta, read once; a Deflated body inflated under ``limits.inflated_cap`` and its
    meta switched to Explicit VR Little Endian (what the inflated body is)."""
    from pydicom.filewriter import validate_file_meta
    from pydicom.uid import ExplicitVRLittleEndian

    meta, body_at, has_preamble = _read_meta(data)
    preamble = data[:128] if has_preamble else None
    if meta is None or str(meta.get("TransferSyntaxUID", "") or "") != DEFLATED:
        return _Body(data, meta, body_at, preamble, False)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        validate_file_meta(meta, enforce_standard=True)
    except Exception:
        raise ImageError("DICOM file meta information cannot be rewritten", "unreadable") from None
    return _Body(inflate(data[body_at:], limits.inflated_cap), meta, 0, preamble, True)


def plain_bytes(data: bytes, limits: Limits) -> tuple[bytes, bool]:
    """``(file bytes, deflated)``: a Deflated file is rewritten as Explicit VR Little Endian,
    its body inflated under ``limits.inflated_cap``; any other file is returned as it is."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    body = _plain_body(data, limits)
    if not body.deflated:
        return data, False
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    try:
        write_file_meta_info(fp, body.meta, enforce_standard=True)
    except Exception:
        raise ImageError("DICOM file meta information cannot be rewritten", "unreadable") from None
    return fp.getvalue() + body.data, True


def _encoding(fp, meta, peek: bytes) -> tuple[bool, bool]:
    """``(implicit VR, little endian)`` of the dataset at ``fp``, decided as pydicom's
    ``read_partial`` decides it (from the transfer syntax, else from the first element)."""
    import pydicom.uid
    from pydicom.values import converters

    syntax = meta.get("TransferSyntaxUID")
    if peek == b"":
        return True, True
    if syntax is None:  # no transfer syntax: guess from the first element's group and VR
        group, _, vr = struct.unpack("<HH2s", fp.read(6))
        fp.seek(-6, 1)
        if vr.decode("iso8859") in converters:
            return False, group < 1024
        return True, True
    if syntax == pydicom.uid.ImplicitVRLittleEndian:
        return True, True
    if syntax == pydicom.uid.ExplicitVRBigEndian:
        return False, False
    if syntax in pydicom.uid.PrivateTransferSyntaxes:
        registered = pydicom.uid.PrivateTransferSyntaxes[pydicom.uid.PrivateTransferSyntaxes.index(syntax)]
        return registered.is_implicit_VR, registered.is_little_endian
    return False, True  # Explicit VR Little Endian and every encapsulated syntax (PS3.5 A.4)


@dataclasses.dataclass
class _Parse:
    """A dataset parsed up to its pixel data, and where to go on reading the rest of it."""

    ds: Any                                    # pydicom.FileDataset, header elements only so far
    fp: Any                                    # the file object, positioned at the pixel data element
    implicit: bool                             # the encoding the elements were read with
    little: bool
    forced: bool                               # no DICM preamble (accepted only as an image header)


def _parse_header(body: _Body) -> _Parse:
    """Parse the dataset up to (not including) its pixel data, from the file meta already read.

    This is pydicom's ``dcmread(..., stop_before_pixels=True)`` without its second file-meta
    read; the elements are read by pydicom's own ``read_dataset``.
    """
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _at_pixel_data, _read_command_set_elements, read_dataset

    forced = body.preamble is None
    if body.meta is None:
        raise ImageError("not a DICOM file (no DICM preamble and no DICOM image header)", "not_dicom")
    fp = io.BytesIO(body.data)
    fp.seek(body.body_at)
    try:
        command_set = _read_command_set_elements(fp)
        peek = fp.read(1)
        if peek != b"":
            fp.seek(-1, 1)
        implicit, little = _encoding(fp, body.meta, peek)
        dataset = read_dataset(fp, implicit, little, stop_when=_at_pixel_data)
        if command_set:
            dataset.update(command_set)
        read_implicit, read_little = dataset.original_encoding
        ds = FileDataset(fp, dataset, body.preamble, body.meta, implicit, little)
        ds.set_original_encoding(implicit, little, dataset._character_set)
    except Exception as exc:
        raise _parse_failure(exc, forced) from None
    if forced and not _image_header(ds):
        raise ImageError("not a DICOM file (no DICM preamble and no DICOM image header)", "not_dicom")
    return _Parse(ds, fp, read_implicit if read_implicit is not None else implicit,
                  read_little if read_little is not None else little, forced)


def _parse_failure(exc: Exception, forced: bool) -> ImageError:
    from pydicom.errors import InvalidDicomError

    if forced or isinstance(exc, InvalidDicomError):
        return ImageError("not a DICOM file (no DICM preamble and no DICOM image header)", "not_dicom")
    if isinstance(exc, (OSError, EOFError)):
        return ImageError(f"DICOM file is truncated or corrupt ({type(exc).__name__})", "unreadable")
    return ImageError(f"DICOM header cannot be parsed ({type(exc).__name__})", "unreadable")  # pydicom raises many types


def _image_header(ds) -> bool:
    try:
        return "SOPClassUID" in ds and "Rows" in ds and bool(str(ds.SOPClassUID).strip())
    except Exception:
        return False


def _parse_rest(parse: _Parse) -> None:
    """Add the pixel data element (and any element after it) to the header dataset: the same
    elements a full ``dcmread`` gives, parsed by pydicom's element reader, once."""
    from pydicom import config
    from pydicom.charset import default_encoding
    from pydicom.filereader import data_element_generator

    rest = {}
    try:
        try:
            for element in data_element_generator(parse.fp, parse.implicit, parse.little, encoding=default_encoding):
                rest[element.tag] = element
        except EOFError:  # read_dataset keeps what was read before a truncation (unless set to raise)
            if config.settings.reading_validation_mode == config.RAISE:
                raise
        except NotImplementedError:
            pass
    except Exception as exc:
        raise _parse_failure(exc, parse.forced) from None
    for tag, element in rest.items():
        parse.ds._dict[tag] = element


def read_dicom(src: str | Path | bytes, stop_before_pixels: bool = False, limits: Limits | None = None):
    """Parse one DICOM file (path or bytes) into a ``pydicom.Dataset``; nothing is decoded.

    A file without the ``DICM`` preamble is accepted only when it still parses into an image
    dataset (SOP Class UID and Rows present), as some old exports write them. A Deflated body
    is inflated under ``limits.inflated_cap``. The file meta and every element are parsed once.

    Args:
        src: a path or the file's bytes.
        stop_before_pixels: skip the pixel data (header-only read).
        limits: size caps (default :class:`Limits`).

    Returns:
        The dataset, pixel data not yet decoded.

    Raises:
        ImageError: ``not_dicom`` (not a DICOM file), ``unreadable`` (truncated or corrupt
            header), ``no_pixel_data`` (parsed, but there is no image in it), ``too_large``.
    """
    limits = limits or Limits()
    quiet_pydicom()
    parse = _parse_header(_plain_body(_load_bytes(src, limits.max_bytes), limits))
    if not stop_before_pixels:
        _parse_rest(parse)
    _check_parsed(parse.ds, stop_before_pixels)
    return parse.ds


def _check_parsed(ds, stop_before_pixels: bool) -> None:
    if len(ds) == 0:
        raise ImageError("DICOM file has no data elements (truncated after the preamble?)", "unreadable")
    if not stop_before_pixels and not has_pixels(ds):
        if _is_image_object(ds):
            raise ImageError("DICOM image file ends before its pixel data (truncated copy?)", "unreadable")
        raise ImageError("DICOM file has no pixel data (not an image object: report, SR, presentation state?)", "no_pixel_data")


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


def has_pixels(ds) -> bool:
    return any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def read_header(ds) -> Header:
    """The checked facts of a parsed header (values parsed safely; see :func:`header_int`)."""
    meta = getattr(ds, "file_meta", None)
    syntax_uid = None
    try:
        syntax_uid = meta.TransferSyntaxUID if meta is not None and "TransferSyntaxUID" in meta else None
    except Exception:
        syntax_uid = None
    syntax, compressed = "1.2.840.10008.1.2", False
    if syntax_uid is not None:
        try:
            known = syntax_uid.is_transfer_syntax
        except Exception:
            known = False
        syntax = str(syntax_uid) if known else "private"
        compressed = bool(syntax_uid.is_compressed) if known else True
    return Header(
        rows=header_int(ds, "Rows", 0) or 0,
        columns=header_int(ds, "Columns", 0) or 0,
        frames=header_int(ds, "NumberOfFrames", 1) or 1,
        samples=header_int(ds, "SamplesPerPixel", 1) or 1,
        bits_allocated=header_int(ds, "BitsAllocated", 0) or 0,
        photometric=header_code(ds, "PhotometricInterpretation", PHOTOMETRIC),
        modality=header_code(ds, "Modality", MODALITIES),
        body_part=header_code(ds, "BodyPartExamined", BODY_PARTS),
        burned_in=header_code(ds, "BurnedInAnnotation", YES_NO),
        transfer_syntax=syntax,
        compressed=compressed,
        deflated=False,
    )


def check_header(header: Header, limits: Limits) -> None:
    """Refuse what the header alone shows cannot be used, before any pixel is read.

    Raises:
        ImageError: ``multi_frame``, ``colour``, ``unreadable`` (no size, odd bits),
            ``too_large``, ``too_small``.
    """
    if header.frames != 1:
        raise ImageError(f"multi-frame image ({header.frames} frames): radsynth expects one 2-D radiograph per file; "
                         "split the frames into single-frame objects", "multi_frame")
    photometric = header.photometric if header.photometric != MISSING else "MONOCHROME2"
    if header.samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"colour image ({photometric}, {header.samples} samples/pixel): radsynth learns grayscale "
                         "radiographs; convert it to MONOCHROME2 or drop it from the export", "colour")
    if header.rows <= 0 or header.columns <= 0:
        raise ImageError("the header does not say how many rows and columns the image has", "unreadable")
    if header.bits_allocated not in (1, 8, 16, 32, 64):
        raise ImageError(f"the header says {header.bits_allocated} bits allocated per pixel; expected 8 or 16", "unreadable")
    if header.rows * header.columns > limits.max_pixels:
        raise ImageError(f"image is {header.columns}x{header.rows} pixels, above the limit of {limits.max_pixels}",
                         "too_large", size=(header.columns, header.rows))
    if min(header.rows, header.columns) < limits.min_side:
        raise ImageError(f"image is {header.columns}x{header.rows} pixels, smaller than the model's "
                         f"{limits.min_side}x{limits.min_side}", "too_small", size=(header.columns, header.rows))


def read_guarded(src: str | Path | bytes, limits: Limits, inspect: Callable[[Any], None] | None = None) -> DicomFile:
    """THE guarded read: bytes capped, Deflated body capped, header checked, codestream sized.

    Args:
        src: a path or the file's bytes.
        limits: what the read may cost (pixel cap, size floor, byte caps).
        inspect: called with the header-only dataset before the image checks (so a caller's own
            refusals, e.g. ingest's modality, come first); it may raise :class:`ImageError`.

    Returns:
        The :class:`DicomFile` (pixels present, not decoded); decode with :func:`dicom_to_array`.

    Raises:
        ImageError: with a reason code and a message free of header values.
    """
    quiet_pydicom()
    body = _plain_body(_load_bytes(src, limits.max_bytes), limits)
    parse, deflated = _parse_header(body), body.deflated  # header only: the pixel data element is not read yet
    del body
    head = parse.ds
    _check_parsed(head, True)
    if inspect is not None:
        inspect(head)
    if not _is_image_object(head):
        raise ImageError("DICOM file has no pixel data (not an image object: report, SR, presentation state?)", "no_pixel_data")
    header = dataclasses.replace(read_header(head), deflated=deflated)
    check_header(header, limits)
    _parse_rest(parse)  # the same dataset goes on to its pixel data: each file is parsed once
    _check_parsed(head, False)
    check_codestream(head, header, limits)
    return DicomFile(head, header)


# --------------------------------------------------------------------------------------
# Compressed codestreams: their own size, read before any decoder runs
# --------------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ marker (raw or in a JP2 box)."""
    at = 0 if data[:4] == b"\xff\x4f\xff\x51" else data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if at < 0 or len(data) < at + 2 + 40:
        return None
    (_, _, _, xsiz, ysiz, xo, yo, _, _, _, _, csiz) = struct.unpack(">HHHIIIIIIIIH", data[at + 2: at + 2 + 40])
    return ysiz - yo, xsiz - xo, csiz


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG / JPEG-LS frame header (SOFn / SOF55)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    for _ in range(512):
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2: i + 4])
        if marker in _SOF:
            if i + 10 > n:
                return None
            _, rows, cols, comps = struct.unpack(">BHHB", data[i + 4: i + 10])
            return rows, cols, comps
        i += 2 + length
    return None


def _first_frame_head(pixel_data: bytes, need: int = 1 << 16) -> bytes:
    """The first bytes of frame 1 of encapsulated pixel data (Basic Offset Table skipped)."""
    from pydicom.encaps import generate_fragments

    head = b""
    for i, fragment in enumerate(generate_fragments(pixel_data)):
        if i == 0:
            continue  # the Basic Offset Table item
        head += fragment[: need - len(head)]
        if len(head) >= need:
            break
    return head


def check_codestream(ds, header: Header, limits: Limits) -> None:
    """For a compressed transfer syntax, the codestream's own size must match the header.

    Raises:
        ImageError: ``inconsistent`` (size or components disagree with the header),
            ``too_large``, ``unsupported`` (a compression this reader cannot size),
            ``unreadable`` (the encapsulated data cannot be parsed).
    """
    if not header.compressed:
        return
    syntax = header.transfer_syntax
    if syntax not in JPEG2000 and syntax not in JPEG and syntax != RLE:
        raise ImageError("the pixel data uses a compression radsynth does not read (only JPEG 2000, JPEG and RLE); "
                         "export the image uncompressed or as JPEG 2000", "unsupported")
    try:
        head = _first_frame_head(ds.PixelData)
    except Exception:
        raise ImageError("the compressed pixel data cannot be parsed (encapsulation broken or truncated)", "unreadable") from None
    if syntax == RLE:
        if len(head) < 64:
            raise ImageError("the RLE pixel data is truncated", "unreadable")
        segments = struct.unpack("<I", head[:4])[0]
        expected = header.samples * max(1, header.bits_allocated // 8)
        if segments != expected or segments > 15:
            raise ImageError(f"the RLE pixel data has {segments} segments; the header implies {expected}", "inconsistent")
        return
    size = _j2k_size(head) if syntax in JPEG2000 else _jpeg_size(head)
    if size is None:
        raise ImageError("the compressed image's own size cannot be read from its codestream; it was not decoded", "unreadable")
    rows, cols, comps = size
    if rows <= 0 or cols <= 0:
        raise ImageError("the compressed image does not state its size in its codestream; it was not decoded", "unreadable")
    if (rows, cols) != (header.rows, header.columns):
        raise ImageError(f"the compressed image inside is {cols}x{rows} pixels but the header says "
                         f"{header.columns}x{header.rows}; the file is inconsistent and was not decoded", "inconsistent")
    if rows * cols > limits.max_pixels:  # equal to the header's size, which check_header capped: a second guard
        raise ImageError(f"the compressed image inside is {cols}x{rows} pixels, above the limit of {limits.max_pixels}",
                         "too_large", size=(cols, rows))
    if comps != header.samples:
        raise ImageError(f"the compressed image has {comps} components but the header says {header.samples}",
                         "colour" if comps > 1 else "inconsistent")


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def dicom_to_array(ds, limits: Limits | None = None) -> np.ndarray:
    """Decode a DICOM image to display intensities following the standard.

    The header and (for compressed syntaxes) the codestream are checked against ``limits``
    first, so a dataset from :func:`read_dicom` is as safe to decode as one from
    :func:`read_guarded`.

    Pixel pipeline (PS3.3 C.7.6.3, C.11.1, C.11.2)::

        stored --modality LUT / rescale--> modality values --VOI LUT or window--> [0, 1]
        --MONOCHROME1 inverted--> [0, 1] (0 = black, 1 = white)

    Args:
        ds: a dataset from :func:`read_dicom`, or the :class:`DicomFile` from
            :func:`read_guarded` (its :class:`Header` is reused, and checked again against
            ``limits`` with the codestream, rather than parsed a second time).
        limits: the caps (default :class:`Limits`).

    Returns:
        float32 ``[H, W]`` in [0, 1]; 0 is black and 1 white whatever the photometric
        interpretation.

    Raises:
        ImageError: ``no_pixel_data``, ``multi_frame``, ``colour``, ``too_large``,
            ``inconsistent``, ``unsupported``, ``unreadable`` (truncated or the codec failed).
    """
    limits = limits or Limits()
    quiet_pydicom()
    header = None
    if isinstance(ds, DicomFile):  # read_guarded parsed its header already: checked again below, not re-read
        ds, header = ds.ds, ds.header
    if not has_pixels(ds):
        raise ImageError("DICOM file has no pixel data", "no_pixel_data")
    header = header or read_header(ds)
    check_header(header, dataclasses.replace(limits, min_side=1))
    check_codestream(ds, header, limits)
    try:
        stored = ds.pixel_array  # [H, W]
    except Exception as exc:
        raise ImageError(_pixel_failure(ds, exc), "unreadable") from None
    if stored.ndim != 2:
        raise ImageError(f"pixel data has shape {stored.shape}, expected one 2-D frame", "multi_frame")
    values = _modality(stored, ds)
    del stored
    out = _apply_voi(values, ds)
    if header.photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


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


def _number(ds, keyword: str, default: float) -> float:
    """A DS value (first of several) as a float; ``default`` when absent; refused when not a number."""
    try:
        if keyword not in ds:
            return default
        value = ds[keyword].value
        if value is None or value == "":
            return default
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = float(value)
    except Exception:
        raise ImageError(f"the header's {keyword} is not a number", "unreadable") from None
    if not np.isfinite(number):
        raise ImageError(f"the header's {keyword} is not a finite number", "unreadable")
    return number


def _modality(stored: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values, float32 (exact for stored values up to 24 bits)."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        except Exception as exc:
            raise ImageError(f"modality LUT cannot be applied ({type(exc).__name__})", "unreadable") from None
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    values = stored.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _stored_range(ds) -> tuple[float, float]:
    bits = header_int(ds, "BitsStored", None) or header_int(ds, "BitsAllocated", 8) or 8
    if (header_int(ds, "PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality_range(ds) -> tuple[float, float]:
    """The range of modality values the stored bits can produce."""
    lo, hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        try:
            out_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        except Exception:
            raise ImageError("the modality LUT descriptor cannot be read", "unreadable") from None
        return 0.0, 2.0**out_bits - 1
    slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def is_little_endian(ds) -> bool:
    """Byte order of the dataset's OB/OW values as stored (the file's transfer syntax)."""
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_transfer_syntax:
            return bool(syntax.is_little_endian)
    except Exception:
        pass
    encoding = getattr(ds, "original_encoding", (None, None))
    return True if encoding[1] is None else bool(encoding[1])


def voi_lut(ds) -> tuple[np.ndarray, int, int]:
    """The first VOI LUT of ``ds``: ``(entries float32 [n], first mapped value, bits per entry)``.

    OW LUT Data is read in the byte order of the file's transfer syntax, as pydicom's
    ``apply_voi`` reads it (an Explicit VR Big Endian file stores it big-endian); an 8-bit LUT
    packed one entry per byte (old files) is accepted. The lookup itself is done by
    :func:`_apply_voi` rather than ``pydicom.pixels.apply_voi``, whose index array takes the
    LUT's entry type and so wraps at 256 for an 8-bit LUT with more than 256 entries.
    """
    try:
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        element = item["LUTData"]
        data = element.value
    except Exception:
        raise ImageError("the VOI LUT cannot be read (descriptor or data missing)", "unreadable") from None
    n = n or 65536
    if isinstance(data, (bytes, bytearray)):
        if len(data) == n and bits <= 8:
            lut = np.frombuffer(data, dtype=np.uint8)
        else:
            order = "<" if is_little_endian(ds) else ">"
            lut = np.frombuffer(data, dtype=f"{order}u2", count=min(n, len(data) // 2))
    else:
        lut = np.asarray(data if isinstance(data, (list, tuple)) or type(data).__name__ == "MultiValue" else [data])
    if lut.size == 0:
        raise ImageError("the VOI LUT has no entries", "unreadable")
    return lut[:n].astype(np.float32), first, bits


def _window(ds) -> tuple[float, float] | None:
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    return _number(ds, "WindowCenter", 0.0), _number(ds, "WindowWidth", 1.0)


def _apply_voi(x: np.ndarray, ds) -> np.ndarray:
    """Modality values (float32) -> [0, 1] by VOI LUT, window, or the full modality range (in place where possible)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut, first, bits = voi_lut(ds)
        idx = np.clip(np.rint(x - first), 0, len(lut) - 1).astype(np.int64)
        top = 2.0**bits - 1 if bits else max(float(lut.max()), 1.0)
        return (lut[idx] / np.float32(top)).astype(np.float32, copy=False)
    window = _window(ds)
    if window is not None:
        c, w = window
        function = header_code(ds, "VOILUTFunction", frozenset(("LINEAR", "LINEAR_EXACT", "SIGMOID")))
        if function == "SIGMOID":
            x -= np.float32(c)
            x *= np.float32(-4.0 / max(w, 1e-6))
            np.exp(x, out=x)
            x += 1.0
            return np.reciprocal(x, out=x)
        if function == "LINEAR_EXACT":
            x -= np.float32(c)
            x /= np.float32(max(w, 1e-6))
            x += 0.5
            return x
        if w <= 1:  # LINEAR needs width >= 1 (C.11.2.1.2.1); width 1 is a threshold
            return (x > c - 0.5).astype(np.float32)
        x -= np.float32(c - 0.5)
        x /= np.float32(w - 1.0)
        x += 0.5
        return x
    lo, hi = _modality_range(ds)
    x -= np.float32(lo)
    x /= np.float32(max(hi - lo, 1e-12))
    return x


__all__ = [
    "DEFAULT_MAX_PIXELS", "DicomFile", "Header", "ImageError", "Limits", "check_codestream", "check_header",
    "dicom_to_array", "has_pixels", "header_code", "header_int", "header_text", "inflate", "quiet_pydicom",
    "plain_bytes", "read_dicom", "read_guarded", "read_header", "voi_lut",
]
