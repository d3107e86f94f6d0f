"""Hostile and awkward DICOM/PNG inputs, built from the real chest DX fixture's header (so each
carries the fixture's identifying values) or from scratch. Shared by the reader tests
(tests/radsynth), the upload tests (tests/serving/web) and the ingest tests (tests/components).

Every builder returns file bytes; none writes to disk.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import struct
import zlib

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless,
                         JPEGBaseline8Bit, RLELossless)

from tests.conftest import FIXTURES

CHEST_DX = FIXTURES / "chest_DX_nih_nhsx.dcm"
NAME_IN_A_NUMBER = "DOE^JANE"                   # a patient name where Number of Frames belongs
ACCESSION = "ACC77770001"                      # planted identifiers (the fixture has neither)
INSTITUTION = "St Elsewhere General"

# A 354-byte JPEG 2000 codestream of an 8192 x 8192 black image (openjpeg.encode of zeros,
# compression ratio 2000): decoding it allocates 64 MiB of pixels and far more in the codec.
J2K_8192 = base64.b64decode(
    "/0//UQApAAAAACAAAAAgAAAAAAAAAAAAAAAgAAAAIAAAAAAAAAAAAAABAAEB/1IADAAAAAEABQQEAAD/XAAjQj8gPvA+8D7ANwA3ADbgL1AvUC9o"
    "GAUYBRhHH9Mf0x9i/2QAJQABQ3JlYXRlZCBieSBPcGVuSlBFRyB2ZXJzaW9uIDIuNS4w/5AACgAAAAAA2QAB/5Pz+MV+MV/jFfjFfjFfjFfjFfjF"
    "f4xX4xX+MV+MV+MV+MV+MV+MUBFQVK//f+mJX/cRUFSv/3/piV/3EVBUr/9/6Ylf9xFQVK//f+mJX/cRUFSv/3/piV/3EVBUr/9/6Ylf9xFQVK//"
    "f+mJX/cRUFSv/3/piV/3EVBUr/9/6Ylf9xFQVK//f+mJX/cRUFSv/3/piV/3EVBUr/9/6Ylf9xFQVK//f+mJX/cRUFSv/3/piV/3EVBUr/9/6Ylf"
    "9xFQVK//f+mJX/eAgICAgP/Z")


@functools.cache
def _fixture() -> pydicom.Dataset:
    return pydicom.dcmread(CHEST_DX)


def identifiers() -> list[str]:
    """The identifying values the chest fixture's header holds, plus the planted name."""
    ds = _fixture()
    values = [str(v) for v in (ds.get("PatientName"), ds.get("PatientID"), ds.get("StudyInstanceUID"),
                               ds.get("SOPInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("InstitutionName"),
                               ds.get("AccessionNumber")) if v]
    return [v for v in values if len(v) >= 5] + [NAME_IN_A_NUMBER, "DOE", "JANE", ACCESSION, INSTITUTION]


def dataset(rows: int = 64, cols: int = 64, **changes) -> pydicom.Dataset:
    """The fixture's header around an 8-bit ``rows x cols`` gradient (Explicit VR Little Endian)."""
    ds = copy.deepcopy(_fixture())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.AccessionNumber, ds.InstitutionName = ACCESSION, INSTITUTION
    ds.PixelData = (np.add.outer(np.arange(rows), np.arange(cols)) * 3 % 256).astype(np.uint8).tobytes()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _meta_bytes(ds: pydicom.Dataset, syntax: str) -> bytes:
    meta = copy.deepcopy(ds.file_meta)
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _body_bytes(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    body = copy.deepcopy(ds)
    body.file_meta = pydicom.dataset.FileMetaDataset()
    write_dataset(fp, body)
    return fp.getvalue()


def deflated(ds: pydicom.Dataset) -> bytes:
    """A well-formed Deflated Explicit VR Little Endian file of ``ds``."""
    raw = _body_bytes(ds)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return _meta_bytes(ds, DeflatedExplicitVRLittleEndian) + c.compress(raw) + c.flush()


def deflate_bomb(inflated_mib: int = 300) -> bytes:
    """A 64 x 64 DICOM whose Deflated body hides ``inflated_mib`` MiB of zeros in a private element
    (about 300 KiB on disk for 300 MiB inflated, as the issue's upload)."""
    ds = dataset()
    pixels = ds.PixelData
    del ds.PixelData
    head = _body_bytes(ds)
    creator = struct.pack("<HH2sH", 0x7FD1, 0x0010, b"LO", 8) + b"RADSYNTH"  # a private group before the pixels
    size = inflated_mib << 20
    blob_head = struct.pack("<HH2sHI", 0x7FD1, 0x1010, b"OB", 0, size)
    tail = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, len(pixels)) + pixels
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(head + creator + blob_head)]
    chunk = bytes(1 << 20)
    for _ in range(inflated_mib):
        parts.append(c.compress(chunk))
    parts += [c.compress(tail), c.flush()]
    return _meta_bytes(ds, DeflatedExplicitVRLittleEndian) + b"".join(parts)


def _encapsulated(ds: pydicom.Dataset, syntax: str, frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return to_bytes(ds)


def j2k_size_lie() -> bytes:
    """~950 bytes: the header says 16 x 16, the JPEG 2000 codestream inside is 8192 x 8192."""
    return _encapsulated(dataset(16, 16), JPEG2000Lossless, J2K_8192)


def j2k_honest(rows: int = 64, cols: int = 64) -> bytes:
    """A well-formed JPEG 2000 DICOM (control: the codestream check lets it through)."""
    import openjpeg

    pixels = (np.add.outer(np.arange(rows), np.arange(cols)) * 3 % 256).astype(np.uint8)
    return _encapsulated(dataset(rows, cols), JPEG2000Lossless, openjpeg.encode(pixels))


def jpeg_size_lie() -> bytes:
    """The header says 64 x 64; the baseline JPEG's frame header (SOF0) says 4096 x 4096."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, 4096, 4096)
    return _encapsulated(dataset(64, 64), JPEGBaseline8Bit, bytes(data))


def rle_wrong_segments() -> bytes:
    """RLE header announcing 3 segments for an 8-bit grey image (which has 1)."""
    header = struct.pack("<16I", 3, 64, 64, 64, *([0] * 12))
    return _encapsulated(dataset(64, 64), RLELossless, header + b"\x00" * 64)


def unsupported_compression() -> bytes:
    """MPEG-2 video inside a radiograph's header: a compression the reader does not size."""
    return _encapsulated(dataset(64, 64), "1.2.840.10008.1.2.4.100", b"\x00\x00\x01\xb3" + b"\x00" * 200)


def private_syntax() -> bytes:
    return _encapsulated(dataset(64, 64), "1.2.826.0.1.3680043.99999.1", b"\x00" * 200)


def frames_is_a_name() -> bytes:
    """Number of Frames (IS) holding a patient name: int() of it would put the name in the log."""
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # the VR comes from the dictionary: IS
    ds.add(DataElement(0x00280008, "LO", NAME_IN_A_NUMBER))
    return to_bytes(ds)


def tiny(rows: int = 1, cols: int = 1) -> bytes:
    return to_bytes(dataset(rows, cols))


def brain_mr() -> bytes:
    return to_bytes(dataset(64, 64, Modality="MR", BodyPartExamined="BRAIN"))


def burned_in() -> bytes:
    return to_bytes(dataset(64, 64, BurnedInAnnotation="YES", BodyPartExamined="CHEST"))


def odd_bits() -> bytes:
    return to_bytes(dataset(64, 64, BitsAllocated=12))


def huge_header(rows: int = 65535, cols: int = 65535) -> bytes:
    """Rows x Columns of 4 gigapixels around 4 KiB of pixel data."""
    ds = dataset()
    ds.Rows, ds.Columns = rows, cols
    return to_bytes(ds)


def big_endian(pixels: np.ndarray, lut: np.ndarray | None = None, first: int = 0, bits: int = 8) -> bytes:
    """A 16-bit image (and optionally a VOI LUT of OW data) in Explicit VR Big Endian."""
    ds = dataset(*pixels.shape)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = pixels.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    if lut is not None:
        item = pydicom.Dataset()
        item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, first, bits]
        item.add(DataElement(0x00283006, "OW", lut.astype(">u2").tobytes()))
        ds.VOILUTSequence = pydicom.Sequence([item])
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return buf.getvalue()


def little_endian_twin(pixels: np.ndarray, lut: np.ndarray | None = None, first: int = 0, bits: int = 8) -> bytes:
    """The same image and LUT as :func:`big_endian`, in Explicit VR Little Endian."""
    ds = dataset(*pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    if lut is not None:
        item = pydicom.Dataset()
        item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, first, bits]
        item.add(DataElement(0x00283006, "OW", lut.astype("<u2").tobytes()))
        ds.VOILUTSequence = pydicom.Sequence([item])
    return to_bytes(ds)


def png_text_bomb(mib: int = 64) -> bytes:
    """A valid 64 x 64 grey PNG with a zTXt chunk that inflates to ``mib`` MiB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)).save(buf, format="PNG")
    png = buf.getvalue()
    c = zlib.compressobj(9)
    text = b"".join(c.compress(bytes(1 << 20)) for _ in range(mib)) + c.flush()
    body = b"Comment\x00\x00" + text
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body) & 0xFFFFFFFF)
    at = png.find(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def png(rows: int, cols: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(rows * cols) % 251).astype(np.uint8).reshape(rows, cols)).save(buf, format="PNG")
    return buf.getvalue()
