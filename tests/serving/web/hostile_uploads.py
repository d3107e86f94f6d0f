"""The web app's hostile-upload corpus: every bad upload with the status and the words its refusal
must carry, the uploads accepted with a warning, the memory bound, and the child-process probe
that posts each one (``tests.memprobe.measure``).

One list for ``tests/serving/web/test_app.py`` (which asserts on each case), ``benchmarks/hostile_uploads.py``
(which tabulates them) and ``benchmarks/soak.py`` (which mixes some into its load). The DICOM
builders of the issue's hostile corpus are in ``tests/radsynth/hostile.py`` (shared with the
reader and ingest tests); the simpler ones here start from the chest fixture as well.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image

from tests.radsynth import hostile as H

from .conftest import CHEST_DX

# --------------------------------------------------------------------------------------
# Test inputs, built from the real fixture DICOM or from scratch
# --------------------------------------------------------------------------------------


dicom_bytes = H.to_bytes


def small_dicom(**changes) -> pydicom.Dataset:
    """The fixture chest DX with its pixels replaced by a 64x64 8-bit gradient."""
    ds = pydicom.dcmread(CHEST_DX)
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = (np.add.outer(np.arange(64), np.arange(64)) % 256).astype(np.uint8).tobytes()
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def multi_frame() -> bytes:
    ds = small_dicom(NumberOfFrames=2)
    ds.PixelData = ds.PixelData * 2
    return dicom_bytes(ds)


def colour_dicom() -> bytes:
    ds = small_dicom(SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8).tobytes()
    return dicom_bytes(ds)


def no_pixels() -> bytes:
    """A structured report: a valid DICOM object with no image in it."""
    ds = small_dicom()
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.Modality = "SR"
    return dicom_bytes(ds)


GREY = (np.random.default_rng(1).random((80, 96)) * 255).astype(np.uint8)
COLOUR = np.stack([GREY, GREY[::-1], np.zeros_like(GREY)], axis=-1)

BAD_UPLOADS = {
    # name: (bytes factory, filename, status, words the message must contain)
    "not an image, named .png": (lambda: b"%PDF-1.7\n" + b"x" * 4000, "scan.png", 415, "not a PNG, JPEG or DICOM"),
    "truncated DICOM": (lambda: CHEST_DX.read_bytes()[:400_000], "chest.dcm", 422, "truncated"),
    "DICOM without pixel data": (no_pixels, "report.dcm", 422, "no pixel data"),
    "multi-frame DICOM": (multi_frame, "cine.dcm", 422, "2 frames"),
    "colour DICOM": (colour_dicom, "rgb.dcm", 422, "colour"),
    "colour PNG": (lambda: png_bytes(COLOUR), "photo.png", 422, "colour"),
    "truncated PNG": (lambda: png_bytes(GREY)[:300], "cut.png", 422, "truncated"),
    "decompression bomb": (lambda: png_bomb(60000, 60000), "bomb.png", 413, "decompression bomb"),
    "too many pixels": (lambda: png_bomb(3000, 3000), "wide.png", 413, "megapixels"),
    "empty file": (lambda: b"", "empty.png", 422, "empty"),
    "DICOM over the pixel cap": (lambda: dicom_bytes(small_dicom(Rows=3000, Columns=3000)), "huge.dcm", 413, "megapixels"),
    # the hostile corpus (tests/radsynth/hostile.py builds each from the fixture's header)
    "Deflated DICOM bomb (300 KiB -> 300 MiB)": (H.deflate_bomb, "bomb.dcm", 413, "inflates past the 9 MiB limit"),
    "JPEG 2000 codestream 8192 x 8192 in a 16 x 16 header": (H.j2k_size_lie, "lie.dcm", 422, "inside is 8192x8192 pixels but the header says 16x16"),
    "JPEG frame header larger than the DICOM header": (H.jpeg_size_lie, "lie.dcm", 422, "inside is 4096x4096 pixels"),
    "RLE with the wrong segment count": (H.rle_wrong_segments, "rle.dcm", 422, "3 segments"),
    "compression we do not read (MPEG-2)": (H.unsupported_compression, "video.dcm", 415, "compression radsynth does not read"),
    "private transfer syntax": (H.private_syntax, "private.dcm", 415, "compression radsynth does not read"),
    "Number of Frames holding a patient name": (H.frames_is_a_name, "name.dcm", 422, "NumberOfFrames is not a whole number"),
    "1 x 1 PNG": (lambda: H.png(1, 1), "dot.png", 422, "smaller than the model's 16 x 16"),
    "8 x 8 PNG (below the model's resolution)": (lambda: H.png(8, 8), "small.png", 422, "smaller than the model's 16 x 16"),
    "1 x 1 DICOM": (H.tiny, "dot.dcm", 422, "smaller than the model's 16 x 16"),
    "12 bits allocated": (H.odd_bits, "odd.dcm", 422, "12 bits allocated"),
    "4-gigapixel DICOM header": (H.huge_header, "giga.dcm", 413, "megapixels"),
    "PNG with a 64 MiB zTXt chunk": (H.png_text_bomb, "text.png", 422, "truncated or corrupt"),
}
# Accepted, with a visible warning on the page (web.off_domain: warn).
WARNED_UPLOADS = {
    "brain MR": (H.brain_mr, "brain.dcm", "says modality MR and body part BRAIN, but the model was trained on DX/CR chest images"),
    "burned-in annotation": (H.burned_in, "burned.dcm", "declares burned-in annotation"),
}
MEMORY_BOUND_PER_PIXEL = 4                     # bytes x web.max_pixels: a refusal costs less than one float32 image


PROBE_SETUP = """
import io, json, logging, re, tempfile
from pathlib import Path

from radsynth.config import load_params
from serving.web.app import create_app
from tests.serving.web.conftest import ROOT, TorchBackend
from tests.serving.web.hostile_uploads import BAD_UPLOADS, WARNED_UPLOADS

tmp = Path(tempfile.mkdtemp(prefix="radsynth-probe-"))
params = load_params(ROOT / "params.yaml", profile="tiny", overrides={
    "web.audit_log": str(tmp / "audit.jsonl"), "web.upload_dir": str(tmp / "uploads"),
    "web.max_upload_bytes": 4 * 2**20, "web.max_pixels": 2048 * 2048, "web.max_images": 4})
backend = TorchBackend(params)
client = create_app(params, backend=backend).test_client()
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(self.format(record))

logging.getLogger().addHandler(Keep(logging.DEBUG))
logging.getLogger().setLevel(logging.DEBUG)
CASES = {name: (make(), filename) for name, (make, filename, *_ ) in {**BAD_UPLOADS, **WARNED_UPLOADS}.items()}

def CALL(name):
    data, filename = CASES[name]
    backend.calls.clear()
    records.clear()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)
    form = {"csrf_token": token, "condition": "NORMAL", "n": "1", "seed": "7", "image": (io.BytesIO(data), filename)}
    resp = client.post("/generate", data=form, content_type="multipart/form-data")
    audit = Path(params.web.audit_log)
    return {"status": resp.status_code, "html": resp.get_data(as_text=True), "calls": list(backend.calls),
            "log": "\\n".join(records), "audit": audit.read_text() if audit.exists() else "",
            "stored": Path(params.web.upload_dir).exists()}
"""


# The control: pydicom alone decoding the JPEG 2000 size lie, which the guard refuses before any
# decoder runs (it must cost far more than the bound, or the probe does not see codec allocations).
CONTROL_SETUP = """
import io, pydicom, warnings
warnings.simplefilter("ignore")
from tests.radsynth import hostile as H
DATA = H.j2k_size_lie()
def CALL(name):
    ds = pydicom.dcmread(io.BytesIO(DATA))
    try:
        ds.pixel_array
    except Exception as exc:
        return type(exc).__name__
    return "decoded"
"""
