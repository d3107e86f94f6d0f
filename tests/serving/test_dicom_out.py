"""Synthetic DICOM: marked synthetic, provenance recorded, nothing identifying, read by pydicom and dcmtk."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from serving.dicom_out import SYNTHETIC_NAME, write_dicom_series

SEED = 2**62 + 5                                                               # larger than any 32-bit field


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 1), dtype=np.uint8)         # [N, H, W, C]
    out = tmp_path_factory.mktemp("dicom")
    paths = write_dicom_series(images, out, model_name="radsynth-generator", model_version="4", seed=SEED, condition="PNEUMONIA")
    return images, paths


def test_pydicom_reads_back_pixels_and_synthetic_markers(series):
    images, paths = series
    assert len(paths) == 3 and all(p.suffix == ".dcm" for p in paths)
    datasets = [pydicom.dcmread(p) for p in paths]
    for index, (ds, image) in enumerate(zip(datasets, images)):
        np.testing.assert_array_equal(ds.pixel_array, image[:, :, 0])
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
        assert str(ds.PatientName) == SYNTHETIC_NAME and ds.PatientID == "SYNTHETIC"
        assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC IMAGE" in ds.ImageComments
        assert f"seed {SEED}" in ds.ImageComments and "PNEUMONIA" in ds.ImageComments and "v4" in ds.ImageComments
        block = ds.private_block(0x0011, "RADSYNTH")
        assert [block[i].value for i in (1, 2, 3, 4, 5)] == ["radsynth-generator", "4", str(SEED), "PNEUMONIA", index]
        assert ds.InstanceNumber == index + 1
        # nothing identifying: no birth date, sex, accession, referring physician, institution
        assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.AccessionNumber == "" and ds.ReferringPhysicianName == ""
        assert "InstitutionName" not in ds and "OtherPatientIDs" not in ds
    # fresh UIDs: one study and series for the call, one SOP instance per image
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1 and len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    again = write_dicom_series(images[:1], paths[0].parent / "again", model_name="m", model_version="1", seed=1, condition="X")
    assert pydicom.dcmread(again[0]).StudyInstanceUID != datasets[0].StudyInstanceUID


def test_dcmtk_dcmdump_reads_it_cleanly(series):
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.fail("dcmdump missing: install dcmtk (`apt-get install -y dcmtk`; `make test` does it)")
    _, paths = series
    done = subprocess.run([dcmdump, "-E", "+E", str(paths[0])], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr and "W:" not in done.stderr                 # no errors or warnings from dcmtk
    out = done.stdout
    assert "=SecondaryCaptureImageStorage" in out
    assert "[DERIVED\\SECONDARY]" in out
    assert "[SYNTHETIC^RADSYNTH]" in out
    assert "(0028,0301) CS [NO]" in out                                         # BurnedInAnnotation
    assert "(0008,0064) CS [SYN]" in out                                        # ConversionType


def _dciodvfy(path) -> tuple[list[str], str]:
    """``(error lines, whole output)`` of dicom3tools' IOD validator on one file."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy missing: install dicom3tools (`apt-get install -y dicom3tools`; `make test` does it)")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    return [line for line in text.splitlines() if "Error" in line], text


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("body_part", ["", "CHEST"])
def test_dciodvfy_finds_no_errors(tmp_path, channels, body_part):
    images = np.random.default_rng(1).integers(0, 256, size=(2, 16, 16, channels), dtype=np.uint8)
    paths = write_dicom_series(images, tmp_path, model_name="radsynth-generator", model_version="4", seed=SEED,
                               condition="PNEUMONIA", body_part=body_part)
    errors, text = _dciodvfy(paths[1])
    assert "SCImage" in text and errors == [], text                            # validated as Secondary Capture, no errors
    ds = pydicom.dcmread(paths[1])
    np.testing.assert_array_equal(ds.pixel_array, images[1] if channels == 3 else images[1, :, :, 0])
    assert ds.PatientOrientation == "" and ("Laterality" in ds) == (body_part == "")
    if body_part:
        assert ds.BodyPartExamined == "CHEST" and "Laterality" not in text     # an unpaired part: not even a warning


def test_dciodvfy_catches_a_missing_type_2c_attribute(tmp_path):
    """The control: the validator does fail a file without the Type 2C attributes it checks."""
    images = np.zeros((1, 16, 16, 1), dtype=np.uint8)
    (path,) = write_dicom_series(images, tmp_path, model_name="m", model_version="1", seed=1, condition="X")
    ds = pydicom.dcmread(path)
    del ds.PatientOrientation
    ds.save_as(path)
    errors, _ = _dciodvfy(path)
    assert any("PatientOrientation" in e for e in errors), errors


def test_one_series_written_in_chunks(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(5, 16, 16, 1), dtype=np.uint8)
    kw = dict(model_name="m", model_version="1", seed=3, condition="X", study_uid="1.2.3.4", series_uid="1.2.3.4.5")
    paths = write_dicom_series(images[:3], tmp_path, **kw) + write_dicom_series(images[3:], tmp_path, first_index=3, **kw)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.3.4.5"} and len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert [p.name for p in paths] == [f"synthetic_X_3_{i:03d}.dcm" for i in range(5)]
