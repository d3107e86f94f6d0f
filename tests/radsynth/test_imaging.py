"""imaging: DICOM decoding by the standard, PNG/JPEG by content, the training preprocessing."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from radsynth.imaging import (
    ImageError,
    decode_image_bytes,
    decode_upload,
    dicom_to_array,
    downsample_levels,
    prepare,
    read_dicom,
)

# deepcopy of a dataset read from bytes warns that the (closed) source buffer is not copied
pytestmark = pytest.mark.filterwarnings("ignore:The ValueError exception:UserWarning")


@pytest.fixture(scope="module")
def dx(dicom_fixtures) -> pydicom.Dataset:
    """The 8-bit MONOCHROME2 chest DX fixture, cropped to 256x256 to keep tests fast."""
    ds = pydicom.dcmread(dicom_fixtures / "chest_DX_nih_nhsx.dcm")
    pixels = ds.pixel_array[384:640, 384:640].astype(np.uint8)  # [256, 256]
    return _with_pixels(ds, pixels, bits_stored=8)


def _with_pixels(ds: pydicom.Dataset, pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2") -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    bits_allocated = 8 if pixels.dtype == np.uint8 else 16
    out.Rows, out.Columns = pixels.shape
    out.BitsAllocated, out.BitsStored, out.HighBit = bits_allocated, bits_stored, bits_stored - 1
    out.PixelRepresentation = 0
    out.SamplesPerPixel = 1
    out.PhotometricInterpretation = photometric
    out.PixelData = np.ascontiguousarray(pixels).tobytes()
    for tag in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTSequence"):
        if tag in out:
            delattr(out, tag)
    return _roundtrip(out)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Write and re-read through read_dicom, as a file from an export would be."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return read_dicom(buf.getvalue())


def test_monochrome1_twin_decodes_to_the_same_pixels(dx):
    stored = dx.pixel_array
    twin = _with_pixels(dx, (255 - stored).astype(np.uint8), bits_stored=8, photometric="MONOCHROME1")
    a, b = dicom_to_array(dx), dicom_to_array(twin)
    assert a.dtype == np.float32 and a.shape == (256, 256)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - (255 - stored) / 255.0).max() > 0.5  # not merely the stored values


def test_12_bit_windowed_and_8_bit_versions_agree(dx):
    stored = dx.pixel_array.astype(np.uint16)
    twelve = copy.deepcopy(dx)
    twelve = _with_pixels(twelve, stored * 16 + 8, bits_stored=12)  # as the sample export encodes them
    twelve.WindowCenter, twelve.WindowWidth = "2048", "4096"
    twelve = _roundtrip(twelve)
    a, b = dicom_to_array(dx), dicom_to_array(twelve)
    assert np.abs(a - b).max() < 2.1e-3  # (16v+8)/4095 vs v/255
    np.testing.assert_array_equal(np.rint(a * 255), np.rint(b * 255))  # same 8-bit picture
    np.testing.assert_array_equal(prepare(a, 64), prepare(b, 64))


def test_12_bit_without_window_uses_the_stored_range(dx):
    stored = dx.pixel_array.astype(np.uint16)
    twelve = _with_pixels(dx, stored * 16, bits_stored=12)
    np.testing.assert_allclose(dicom_to_array(twelve), stored * 16 / 4095.0, atol=1e-6)


def test_rescale_then_first_window_value_then_linear_function(dx):
    stored = dx.pixel_array.astype(np.uint16)
    ds = _with_pixels(dx, stored, bits_stored=16)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-100"
    ds.WindowCenter, ds.WindowWidth = ["150", "999"], ["201", "5"]  # multiple values: the first applies
    ds = _roundtrip(ds)
    x = stored * 2.0 - 100.0
    expected = np.clip((x - 149.5) / 200.0 + 0.5, 0, 1)
    np.testing.assert_allclose(dicom_to_array(ds), expected, atol=1e-6)
    ds.VOILUTFunction = "SIGMOID"
    np.testing.assert_allclose(dicom_to_array(ds), 1 / (1 + np.exp(-4 * (x - 150) / 201)), atol=1e-6)


def test_voi_lut_sequence_takes_precedence_over_window(dx):
    ds = copy.deepcopy(dx)
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = np.arange(255, -1, -1, dtype="<u2").tobytes()  # an inverting LUT (OW)
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.WindowCenter, ds.WindowWidth = "10", "2"
    ds = _roundtrip(ds)
    np.testing.assert_allclose(dicom_to_array(ds), (255 - dx.pixel_array) / 255.0, atol=1e-6)


def test_jpeg2000_fixtures_decode(dicom_fixtures):
    cr = read_dicom(dicom_fixtures / "chest_CR_nema_RG1_J2KI.dcm")
    assert cr.file_meta.TransferSyntaxUID.is_compressed
    img = dicom_to_array(cr)
    assert img.shape == (1955, 1841) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    # MONOCHROME1 with a window: the film-like background (high stored values) ends up bright.
    assert img.mean() > 0.5
    ct = dicom_to_array(read_dicom(dicom_fixtures / "CT_abdomen_pancreas_j2k.dcm"))
    assert ct.shape == (512, 512) and ct.std() > 0


def test_other_fixtures_decode_in_range(dicom_fixtures):
    for name in ("MR_abdomen_overlay.dcm", "MR_shoulder_nema_MR2_UNCR.dcm"):
        img = dicom_to_array(read_dicom(dicom_fixtures / name))
        assert img.ndim == 2 and 0.0 <= img.min() < img.max() <= 1.0


def test_multi_frame_and_colour_are_rejected_with_advice(dx):
    multi = copy.deepcopy(dx)
    multi.NumberOfFrames = 2
    multi.PixelData = dx.PixelData * 2
    with pytest.raises(ImageError, match="multi-frame .*split the frames") as err:
        dicom_to_array(_roundtrip(multi))
    assert err.value.reason == "multi_frame"
    rgb = _with_pixels(dx, dx.pixel_array, bits_stored=8)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = np.repeat(dx.pixel_array[..., None], 3, axis=2).tobytes()
    with pytest.raises(ImageError, match="colour image") as err:
        dicom_to_array(_roundtrip(rgb))
    assert err.value.reason == "colour"


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda raw: raw[: len(raw) // 2], "unreadable"),        # cut in the pixel data
        (lambda raw: raw[:600], "unreadable"),                   # cut in the header
        (lambda raw: b"hello, this is a text file\n" * 40, "not_dicom"),
        (lambda raw: b"", "not_dicom"),
    ],
    ids=["truncated-pixels", "truncated-header", "text", "empty"],
)
def test_bad_files_raise_image_error_with_a_reason(dx, make, reason):
    buf = io.BytesIO()
    dx.save_as(buf)
    with pytest.raises(ImageError) as err:
        dicom_to_array(read_dicom(make(buf.getvalue())))
    assert err.value.reason == reason


def test_no_pixel_data_object(dx):
    ds = copy.deepcopy(dx)
    del ds.PixelData
    for tag in ("Rows", "Columns"):
        delattr(ds, tag)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageError) as err:
        read_dicom(buf.getvalue())
    assert err.value.reason == "no_pixel_data"


# --- PNG / JPEG ----------------------------------------------------------------------------


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_gray_16bit_and_rgb():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_allclose(decode_image_bytes(_encode(gray, "PNG")), gray / 255.0, atol=1e-7)
    wide = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    np.testing.assert_allclose(decode_image_bytes(_encode(wide, "PNG")), wide / 65535.0, atol=1e-6)
    rgb = np.stack([gray, gray, gray], axis=-1)
    np.testing.assert_allclose(decode_image_bytes(_encode(rgb, "PNG")), gray / 255.0, atol=1e-7)
    jpeg = decode_image_bytes(_encode(gray, "JPEG", quality=95))
    assert jpeg.shape == (16, 16) and np.abs(jpeg - gray / 255.0).mean() < 0.02


def test_image_bytes_checked_by_content_and_size():
    with pytest.raises(ImageError, match="not a PNG or JPEG") as err:
        decode_image_bytes(b"GIF89a....")
    assert err.value.reason == "not_image"
    png = _encode(np.zeros((100, 100), np.uint8), "PNG")
    with pytest.raises(ImageError) as err:
        decode_image_bytes(png[: len(png) // 2])
    assert err.value.reason == "not_image"
    with pytest.raises(ImageError, match="above the limit") as err:
        decode_image_bytes(png, max_pixels=99 * 100)
    assert err.value.reason == "too_large"


# --- prepare --------------------------------------------------------------------------------


def test_prepare_crops_the_centre_square_and_resizes_with_area_averaging():
    img = np.zeros((40, 80), np.float32)
    img[:, 20:60] = 1.0  # the centre square is all white, the side bands black
    out = prepare(img, 8)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    assert (out == 255).all()
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)  # 1-pixel checkerboard
    small = prepare(checker, 16, channels=3)
    assert small.shape == (3, 16, 16)
    assert set(np.unique(small)) <= {127, 128}  # anti-aliased: averaged, not sampled
    assert (small[0] == small[2]).all()


def test_prepare_is_deterministic_and_maps_range():
    rng = np.random.default_rng(0)
    img = rng.random((50, 50)).astype(np.float32)
    np.testing.assert_array_equal(prepare(img, 32), prepare(img.copy(), 32))
    assert prepare(np.zeros((9, 9)), 4).max() == 0 and prepare(np.ones((9, 9)), 4).min() == 255


def test_downsample_levels_are_exact_block_means():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 1, 16, 16), dtype=np.uint8)
    levels = downsample_levels(images, [4, 8, 16])
    assert levels[16] is images
    expected = images.reshape(3, 1, 4, 4, 4, 4).astype(np.float64).mean(axis=(3, 5))
    np.testing.assert_array_equal(levels[4], np.rint(expected).astype(np.uint8))
    assert levels[8].shape == (3, 1, 8, 8) and levels[8].dtype == np.uint8


def test_decode_upload_detects_the_kind_by_content(dx):
    buf = io.BytesIO()
    dx.save_as(buf)
    np.testing.assert_array_equal(decode_upload(buf.getvalue()), dicom_to_array(dx))
    png = _encode(dx.pixel_array, "PNG")
    np.testing.assert_allclose(decode_upload(png), dicom_to_array(dx), atol=1e-7)
    with pytest.raises(ImageError, match="above the limit"):
        decode_upload(buf.getvalue(), max_pixels=100)


# --- the guarded reader: every hostile input refused with a reason, before it costs memory ---------


HOSTILE = {
    # builder: (reason, words of the message)
    "deflate_bomb": ("too_large", "inflates past the 9 MiB limit"),
    "j2k_size_lie": ("inconsistent", "inside is 8192x8192 pixels but the header says 16x16"),
    "jpeg_size_lie": ("inconsistent", "inside is 4096x4096 pixels but the header says 64x64"),
    "rle_wrong_segments": ("inconsistent", "3 segments; the header implies 1"),
    "unsupported_compression": ("unsupported", "compression radsynth does not read"),
    "private_syntax": ("unsupported", "compression radsynth does not read"),
    "frames_is_a_name": ("unreadable", "NumberOfFrames is not a whole number"),
    "tiny": ("too_small", "1x1 pixels, smaller than the model's 16x16"),
    "odd_bits": ("unreadable", "12 bits allocated"),
    "huge_header": ("too_large", "65535x65535 pixels, above the limit"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_guarded_reader_refuses_hostile_dicom_without_echoing_the_header(name):
    from radsynth.dicom import Limits, read_guarded
    from tests.radsynth import hostile

    reason, words = HOSTILE[name]
    with pytest.raises(ImageError) as err:
        read_guarded(getattr(hostile, name)(), Limits(max_pixels=2048 * 2048, min_side=16))
    assert err.value.reason == reason and words in str(err.value)
    for value in hostile.identifiers():
        assert value not in str(err.value)


def test_the_hostile_inputs_are_real():
    """Controls: the bomb really inflates past its size, the lie really is an 8192 x 8192 codestream,
    and an honest file of each kind passes the same checks."""
    import zlib

    from radsynth.dicom import Limits, _j2k_size, inflate, read_guarded
    from tests.radsynth import hostile

    from radsynth.dicom import _meta

    bomb = hostile.deflate_bomb(inflated_mib=40)
    _, body_at = _meta(bomb)
    assert len(bomb) < 64 * 1024
    assert len(zlib.decompress(bomb[body_at:], -zlib.MAX_WBITS)) > 40 << 20  # unguarded: 40 MiB from < 64 KiB
    with pytest.raises(ImageError, match="inflates past the 8 MiB limit"):
        inflate(bomb[body_at:], 8 << 20)
    assert _j2k_size(hostile.J2K_8192) == (8192, 8192, 1)
    limits = Limits(max_pixels=2048 * 2048, min_side=16)
    for ok in (hostile.deflated(hostile.dataset(64, 64)), hostile.j2k_honest(), hostile.brain_mr()):
        assert dicom_to_array(read_guarded(ok, limits).ds, limits).shape == (64, 64)
    assert read_guarded(hostile.deflated(hostile.dataset(64, 64)), limits).header.deflated is True


def test_header_codes_are_echoed_only_when_standard():
    from radsynth.dicom import Limits, read_guarded
    from tests.radsynth import hostile

    ds = hostile.dataset(64, 64, Modality="MR", BodyPartExamined="SMITH JOHN", BurnedInAnnotation="MAYBE")
    header = read_guarded(hostile.to_bytes(ds), Limits(min_side=16)).header
    assert (header.modality, header.body_part, header.burned_in) == ("MR", "unrecognised value", "unrecognised value")
    assert read_guarded(hostile.brain_mr(), Limits()).header.body_part == "BRAIN"


def test_reading_a_name_in_a_number_prints_nothing(tmp_path):
    """pydicom warns (log + warnings) quoting the value; the reader silences both, in a fresh process."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("from radsynth.dicom import ImageError, Limits, read_guarded\n"
            "from tests.radsynth import hostile\n"
            "import logging; logging.basicConfig(level=logging.DEBUG)\n"
            "try:\n    read_guarded(hostile.frames_is_a_name(), Limits())\nexcept ImageError as e:\n    print(e.reason)\n")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.stdout.strip() == "unreadable", proc.stderr
    assert "DOE" not in proc.stderr and "JANE" not in proc.stderr, proc.stderr
    # control: pydicom alone, in the same kind of process, does print the name
    control = subprocess.run([sys.executable, "-W", "always", "-c",
                              "import io, pydicom, logging; logging.basicConfig()\n"
                              "from tests.radsynth import hostile\n"
                              "ds = pydicom.dcmread(io.BytesIO(hostile.frames_is_a_name()))\nds.get('NumberOfFrames')\n"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "DOE^JANE" in control.stderr


# --- VOI LUT data in the file's byte order (issue 15) -------------------------------------------


def test_voi_lut_of_a_big_endian_file_reads_like_its_little_endian_twin():
    from pydicom.pixels import apply_voi

    from tests.radsynth import hostile

    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, size=(32, 32)).astype(np.uint16)
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # inverting 12-bit LUT, 16-bit entries
    be = read_dicom(hostile.big_endian(stored, lut, bits=12))
    le = read_dicom(hostile.little_endian_twin(stored, lut, bits=12))
    assert not be.file_meta.TransferSyntaxUID.is_little_endian
    expected = (4095 - stored) / 4095.0
    np.testing.assert_allclose(dicom_to_array(be), expected, atol=1e-6)
    np.testing.assert_allclose(dicom_to_array(le), expected, atol=1e-6)
    # pydicom's own apply_voi agrees on the big-endian file (where its index type suffices)
    np.testing.assert_array_equal(apply_voi(be.pixel_array, be), 4095 - stored)


def test_voi_lut_8_bit_entries_with_more_than_256_of_them():
    """pydicom's apply_voi indexes with the entry type (uint8) and wraps at 256; ours does not."""
    from tests.radsynth import hostile

    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    lut = (np.arange(4096) // 16).astype(np.uint16)  # 12-bit in, 8-bit out
    ds = read_dicom(hostile.big_endian(stored, lut, bits=8))
    np.testing.assert_allclose(dicom_to_array(ds), (stored // 16) / 255.0, atol=1e-6)
    from pydicom.pixels import apply_voi

    assert not np.array_equal(apply_voi(ds.pixel_array, ds), stored // 16)  # why the lookup is ours (pydicom 3 gets this wrong)


def test_big_endian_voi_would_be_wrong_read_little_endian():
    """Control: the same bytes read little-endian (the old code) give a different picture."""
    from radsynth.dicom import voi_lut
    from tests.radsynth import hostile

    stored = np.arange(1024, dtype=np.uint16).reshape(32, 32)
    lut = np.arange(4096, dtype=np.uint16)
    ds = read_dicom(hostile.big_endian(stored, lut, bits=12))
    entries, _, _ = voi_lut(ds)
    wrong = np.frombuffer(ds.VOILUTSequence[0].LUTData, dtype="<u2")
    np.testing.assert_array_equal(entries, lut)
    assert (wrong != lut).any()


@pytest.mark.parametrize("name", ["deflated", "j2k_honest", "chest_CR_nema_RG1_J2KI.dcm", "CT_abdomen_pancreas_j2k.dcm",
                                  "MR_shoulder_nema_MR2_UNCR.dcm", "huge_header", "tiny", "frames_is_a_name"])
def test_guarded_read_parses_once_and_reaches_pixel_data_only_after_the_header_checks(name, dicom_fixtures, monkeypatch):
    """One file-meta read, every element parsed once (Deflated, JPEG 2000, uncompressed), and
    Pixel Data parsed only after check_header passed: never for a file the header refuses."""
    import radsynth.dicom as dicom
    from tests.radsynth import hostile
    from tests.radsynth.parse_log import install

    data = (hostile.deflated(hostile.dataset(64, 64)) if name == "deflated"
            else (dicom_fixtures / name).read_bytes() if name.endswith(".dcm") else getattr(hostile, name)())
    limits = dicom.Limits(max_pixels=2048 * 2048, min_side=16)
    log = install(monkeypatch)
    real_check = dicom.check_header

    def check_header(*args, **kwargs):
        real_check(*args, **kwargs)
        log.mark("header_passed")

    monkeypatch.setattr(dicom, "check_header", check_header)
    try:
        checked = dicom.read_guarded(data, limits)
    except ImageError:
        checked = None
    assert log.meta_reads == 1 and not log.reparsed and len(log.elements) > 10
    pixels = log.pixel_reads()
    if name in ("huge_header", "tiny", "frames_is_a_name"):
        assert checked is None and pixels == []
    else:
        assert checked is not None and len(pixels) == 1 and log.first("header_passed") < pixels[0]
        assert dicom_to_array(checked, limits).ndim == 2
        assert log.meta_reads == 1 and not log.reparsed  # decoding parses nothing again
