"""Ingest: exact quarantine counts on the sample, no PHI anywhere, bad inputs handled."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from components.ingest import REASONS, IngestError, ingest, read_labels
from radsynth.config import load_params, parse_override
from radsynth.deid import Pseudonyms, load_salt, pseudonym
from radsynth.imaging import decode_image_bytes, dicom_to_array, prepare, read_dicom
from tests.components.ingest_sample import SAMPLE_RESOLUTION, TEST_SALT, overrides_for, run_cli, sample_run
from tests.conftest import ROOT

# What the sample export holds (found by reading every header and decoding every image; see
# the module docstring of components/ingest.py for the reasons):
EXPECTED_QUARANTINE = {
    # data/dicom/GZ0647447/A20160077.dcm and GZ8946136/A25893433.dcm: valid headers, but their
    # 8-bit 128x128 pixel data stops after 4,720 and 4,710 of 16,384 bytes (truncated copies).
    "unreadable": 2,
    # GZ9000000/X00000001.dcm is a CT and GZ9000001/X00000002.dcm an MR (no body part):
    # not chest radiographs (data.allowed_modalities = DX, CR). Neither has a label row either;
    # a record is quarantined once, for the first reason found.
    "wrong_modality": 2,
    # 12 pairs of files carry byte-identical pixel data under two accession numbers of the
    # same patient (e.g. GZ0171892/A23430624 and A23438543); 4 more files are the same image
    # re-encoded (12-bit windowed vs 8-bit, MONOCHROME1 vs MONOCHROME2) and decode to the
    # same pixels; one image (GZ7428250) exists three times. One copy of each is kept:
    # 11 byte-identical groups x 1 + the triple x 2 + 3 re-encoded pairs x 1 = 16.
    "duplicate_image": 16,
    # labels.csv has 5,219 rows; 5,216 name a chest study in the export, 3 name none.
    "label_without_study": 3,
}
# 5,218 files - 2 unreadable - 2 non-chest - 16 duplicates.
EXPECTED_IMAGES = 5198
EXPECTED_CLASS_COUNTS = {"NORMAL": 1339, "PNEUMONIA_BACTERIAL": 2516, "PNEUMONIA_VIRAL": 1343}
# 2,846 chest patients; one of them (GZ0647447) has only the truncated study.
EXPECTED_PATIENTS = 2845


@pytest.fixture(scope="module")
def run(sample_export):
    result = sample_run()
    assert result.codes["ingest"] == 0, result.logs["ingest"]
    return result


def test_sample_quarantine_counts_are_exact(run):
    report = json.loads((run.artifacts / "ingest" / "quarantine.json").read_text())
    expected = {reason: EXPECTED_QUARANTINE.get(reason, 0) for reason in REASONS}
    assert report["counts"] == expected
    assert report["total"] == sum(EXPECTED_QUARANTINE.values()) == len(report["entries"])
    entries = report["entries"]
    assert all(set(e) == {"record", "kind", "reason", "detail"} for e in entries)
    assert {e["kind"] for e in entries if e["reason"] == "label_without_study"} == {"label_row"}
    truncated = [e["detail"] for e in entries if e["reason"] == "unreadable"]
    assert sorted(truncated) == ["pixel data truncated: 4710 of 16384 bytes", "pixel data truncated: 4720 of 16384 bytes"]


def test_sample_images_manifest_and_summary(run):
    out = run.artifacts / "ingest"
    images = np.load(out / "images.npy")
    assert images.shape == (EXPECTED_IMAGES, 1, SAMPLE_RESOLUTION, SAMPLE_RESOLUTION) and images.dtype == np.uint8
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "study", "patient", "label"]
    assert [int(r["index"]) for r in rows] == list(range(EXPECTED_IMAGES))
    assert len({r["study"] for r in rows}) == EXPECTED_IMAGES
    assert len({r["patient"] for r in rows}) == EXPECTED_PATIENTS
    counts = {c: sum(r["label"] == c for r in rows) for c in EXPECTED_CLASS_COUNTS}
    assert counts == EXPECTED_CLASS_COUNTS
    summary = json.loads((out / "ingest.json").read_text())
    assert summary["classes"] == sorted(EXPECTED_CLASS_COUNTS)  # from the data, not from code
    assert summary["num_images"] == EXPECTED_IMAGES and summary["workers"] == 2
    assert (out / "params.yaml").is_file()
    # The printed run summary carries the counts.
    for reason, n in EXPECTED_QUARANTINE.items():
        assert any(line.split() == [reason, str(n)] for line in run.logs["ingest"].splitlines()), run.logs["ingest"]


def test_ingested_image_is_exactly_imaging_prepare(run, sample_export):
    """The web app's path (imaging.prepare on a decoded file) equals the training data."""
    salt = TEST_SALT.encode()
    with open(run.artifacts / "ingest" / "manifest.csv", newline="") as fh:
        index = {r["study"]: int(r["index"]) for r in csv.DictReader(fh)}
    images = np.load(run.artifacts / "ingest" / "images.npy")
    # A 12-bit windowed MONOCHROME1 study and an 8-bit MONOCHROME2 one.
    checked = set()
    for path in sorted((sample_export / "dicom").rglob("*.dcm")):
        ds = read_dicom(path)
        key = (str(ds.PhotometricInterpretation), int(ds.BitsStored))
        if key in checked or key not in {("MONOCHROME1", 12), ("MONOCHROME2", 8)}:
            continue
        study = pseudonym(salt, "study", str(ds.AccessionNumber))
        if study not in index:
            continue
        np.testing.assert_array_equal(images[index[study]], prepare(dicom_to_array(ds), SAMPLE_RESOLUTION))
        checked.add(key)
        if len(checked) == 2:
            break
    assert len(checked) == 2


@functools.cache
def _identifiers(export: Path) -> frozenset[bytes]:
    """Every identifying value in the export's headers, plus its file and folder names."""
    found: set[str] = set()
    for path in (export / "dicom").rglob("*"):
        rel = path.relative_to(export / "dicom")
        found.update({rel.as_posix(), path.stem} if path.is_file() else {path.name})
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for el in ds.iterall():
            if el.VR not in ("PN", "DA", "DT", "UI", "LO", "SH", "LT", "ST", "UT") or el.keyword in (
                "StudyDescription", "SeriesDescription", "SOPClassUID", "ImplementationVersionName"
            ):
                continue
            values = el.value if isinstance(el.value, (list, tuple, pydicom.multival.MultiValue)) else [el.value]
            for value in values:
                text = str(value).strip()
                if el.VR == "UI" and text.startswith("1.2.840.10008."):
                    continue  # standard UIDs (transfer syntaxes, SOP classes) are not identifying
                found.add(text)
                if el.VR == "PN":
                    found.update(part for part in text.split("^") if len(part) >= 5)
    return frozenset(v.encode() for v in found if len(v) >= 6)


def _find(blob: bytes, needles: set[bytes], k: int = 6) -> set[bytes]:
    """Which needles (each >= k bytes) occur in blob; vectorised over k-byte windows."""
    if len(blob) < k:
        return set()
    by_prefix: dict[int, list[bytes]] = defaultdict(list)
    for n in needles:
        by_prefix[int.from_bytes(n[:k], "little")].append(n)
    keys = np.array(sorted(by_prefix), dtype=np.uint64)
    arr = np.frombuffer(blob, dtype=np.uint8)
    m = len(arr) - k + 1
    windows = np.zeros(m, dtype=np.uint64)
    for i in range(k):
        windows |= arr[i : i + m].astype(np.uint64) << np.uint64(8 * i)
    hits = np.flatnonzero(np.isin(windows, keys))
    return {n for h in hits for n in by_prefix[int(windows[h])] if blob.startswith(n, int(h))}


def test_no_identifying_value_in_any_output(run, sample_export):
    needles = _identifiers(sample_export) | {TEST_SALT.encode()}
    assert len(needles) > 5 * 5218  # names, IDs, dates, accessions, UIDs, institution, ... per file
    files = [p for p in run.artifacts.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} >= {"ingest", "dataset", "validate"} and len(files) >= 15
    leaks = {}
    for path in files:
        found = _find(path.read_bytes(), needles) | _find(str(path.relative_to(run.artifacts)).encode(), needles)
        if found:
            leaks[str(path.relative_to(run.artifacts))] = sorted(found)[:3]
    for step, log in run.logs.items():
        found = _find(log.encode(), needles)
        if found:
            leaks[f"log of {step}"] = sorted(found)[:3]
    assert not leaks


def test_the_phi_scan_can_fail(sample_export):
    needles = _identifiers(sample_export)
    one = next(n for n in needles if n.startswith(b"A") and len(n) == 9)  # an accession number
    assert _find(b"\x00\x01prefix" + one + b"suffix", needles) == {one}
    assert not _find(b"nothing identifying here", needles)


# --- small exports built from real files -------------------------------------------------


def _mini_export(tmp_path: Path, sample_export: Path, n: int = 6) -> tuple[Path, list[tuple[Path, str, str]]]:
    """A copy of the first n sample studies: [(copied path, accession, label)]."""
    with open(sample_export / "labels.csv", newline="") as fh:
        labels = {r["accession_number"]: r["label"] for r in csv.DictReader(fh)}
    dicom = tmp_path / "export" / "dicom"
    studies = []
    for path in sorted((sample_export / "dicom").rglob("A*.dcm"))[:n]:
        accession = str(read_dicom(path, stop_before_pixels=True).AccessionNumber)
        target = dicom / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        studies.append((target, accession, labels[accession]))
    return dicom, studies


def _write_labels(path: Path, rows, header=("accession_number", "label")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def _params(tmp_path: Path, dicom: Path, labels: Path, **extra):
    salt = tmp_path / "salt"
    salt.write_text(TEST_SALT)
    sets = overrides_for(tmp_path / "artifacts", salt, **{"data.dicom_dir": str(dicom), "data.labels_csv": str(labels), **extra})
    return load_params(ROOT / "params.yaml", profile="tiny", overrides=dict(parse_override(s) for s in sets)), sets


def test_bad_records_are_quarantined_with_a_reason(tmp_path, sample_export, dicom_fixtures):
    dicom, studies = _mini_export(tmp_path, sample_export)
    bad = dicom / "bad"
    bad.mkdir()
    (bad / "cut.dcm").write_bytes(studies[2][0].read_bytes()[:-3000])        # truncated pixel data
    (bad / "report.dcm").write_bytes(b"%PDF-1.4 not an image\n" * 20)        # not DICOM, named .dcm
    shutil.copy(dicom_fixtures / "MR_abdomen_overlay.dcm", bad / "mr.dcm")    # wrong modality
    ds = pydicom.dcmread(studies[1][0])                                       # same pixels, new study
    ds.AccessionNumber = "TWIN0000001"
    ds.save_as(bad / "twin.dcm")
    label_rows = [(a, y) for _, a, y in studies[1:]]                          # studies[0]: no label row
    label_rows += [("TWIN0000001", studies[1][2]), ("NOSUCHSTUDY9", "NORMAL")]  # ... and one without study
    labels = _write_labels(tmp_path / "labels.csv", label_rows)
    params, _ = _params(tmp_path, dicom, labels, **{"data.workers": 1})
    result = ingest(params, progress=False)
    report = json.loads((result.out_dir / "quarantine.json").read_text())
    assert {k: v for k, v in report["counts"].items() if v} == {
        "unreadable": 1, "not_dicom": 1, "wrong_modality": 1, "no_label": 1, "label_without_study": 1, "duplicate_image": 1,
    }
    assert result.num_images == len(studies) - 1
    assert {e["kind"] for e in report["entries"] if e["reason"] == "not_dicom"} == {"file"}


def test_unknown_and_implausible_labels_are_quarantined(tmp_path, sample_export):
    dicom, studies = _mini_export(tmp_path, sample_export, n=4)
    rows = [(a, y) for _, a, y in studies]
    rows[1] = (rows[1][0], "CARDIOMEGALY")
    rows[2] = (rows[2][0], "Smith^John 1970-01-01 !!")
    labels = _write_labels(tmp_path / "labels.csv", rows)
    classes = ["NORMAL", "PNEUMONIA_BACTERIAL", "PNEUMONIA_VIRAL"]
    params, _ = _params(tmp_path, dicom, labels, **{"data.workers": 1, "data.classes": classes})
    result = ingest(params, progress=False)
    report = json.loads((result.out_dir / "quarantine.json").read_text())
    assert report["counts"]["unknown_label"] == 2
    assert result.num_images == 2 and result.classes == tuple(classes)
    assert "Smith" not in (result.out_dir / "quarantine.json").read_text()  # an implausible label is not echoed


def test_one_and_two_workers_give_identical_outputs(tmp_path, sample_export):
    dicom, studies = _mini_export(tmp_path, sample_export, n=8)
    labels = _write_labels(tmp_path / "labels.csv", [(a, y) for _, a, y in studies])
    outs = []
    for workers in (1, 2):
        params, _ = _params(tmp_path, dicom, labels)
        res = ingest(params, out_dir=tmp_path / f"out{workers}", workers=workers, progress=False)
        assert res.workers == workers and res.num_images == 8
        outs.append(res.out_dir)
    for name in ("images.npy", "manifest.csv", "quarantine.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"accession_number,label\n", "no rows"),
        (b"accession_number,diagnosis\nA1,NORMAL\n", "no column 'label'"),
        (b"acc,label\nA1,NORMAL\n", "no column 'accession_number'"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
    ids=["empty", "header-only", "missing-label-column", "missing-accession-column", "not-utf8"],
)
def test_malformed_labels_file_is_one_clear_error(tmp_path, sample_export, content, message):
    dicom, _ = _mini_export(tmp_path, sample_export, n=2)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    _, sets = _params(tmp_path, dicom, labels)
    code, out = run_cli("ingest", sets)
    assert code == 2
    assert message in out and "Traceback" not in out
    assert out.strip().startswith("radsynth ingest: error:") and len(out.strip().splitlines()) == 1


def test_missing_labels_file_and_export_folder_are_clear_errors(tmp_path, sample_export):
    dicom, _ = _mini_export(tmp_path, sample_export, n=2)
    params, _ = _params(tmp_path, dicom, tmp_path / "nope.csv")
    with pytest.raises(IngestError, match="labels file .* not found"):
        ingest(params, progress=False)
    params, _ = _params(tmp_path, tmp_path / "nodir", tmp_path / "nope.csv")
    with pytest.raises(IngestError, match="DICOM folder .* not found"):
        ingest(params, progress=False)


def test_labels_rows_duplicated_or_conflicting(tmp_path):
    salt = b"x" * 32
    labels = _write_labels(tmp_path / "l.csv", [("A1", "NORMAL"), ("A1", "NORMAL"), ("A2", "NORMAL"), ("A2", "VIRAL"), ("", "NORMAL")])
    got = read_labels(labels, Pseudonyms(salt))
    assert got.by_study == {pseudonym(salt, "study", "A1"): "NORMAL", pseudonym(salt, "study", "A2"): "NORMAL"}
    assert got.conflicting == {pseudonym(salt, "study", "A2")}
    assert sorted(q.reason for q in got.quarantine) == ["bad_label_row", "duplicate_label_row"]


# --- folders of PNG/JPEG -----------------------------------------------------------------


def test_folder_source_reads_classes_from_folder_names(tmp_path, sample_export):
    from PIL import Image

    root = tmp_path / "images"
    sources = sorted((sample_export / "dicom").rglob("A*.dcm"))[:6]
    for i, path in enumerate(sources):
        img = np.rint(dicom_to_array(read_dicom(path)) * 255).astype(np.uint8)
        cls = ("healthy", "sick")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"person{i // 2}_img{i}.{'png' if i < 4 else 'jpg'}")
    (root / "sick" / "notes.png").write_text("this is not an image")        # wrong content
    Image.fromarray(img).save(root / "stray.png")                           # outside a class folder
    shutil.copy(root / "healthy" / "person0_img0.png", root / "healthy" / "person0_copy.png")  # duplicate
    params, _ = _params(tmp_path, tmp_path, tmp_path / "unused.csv",
                        **{"data.source": "folders", "data.image_dir": str(root), "data.folder_patient_regex": r"^(person\d+)_", "data.workers": 1})
    result = ingest(params, progress=False)
    assert result.classes == ("healthy", "sick")
    assert result.num_images == 6 and result.class_counts == {"healthy": 3, "sick": 3}
    assert result.num_patients == 3  # person0..person2 from the regex
    assert result.quarantine == {"not_image": 1, "no_label": 1, "duplicate_image": 1}
    text = (result.out_dir / "manifest.csv").read_text() + (result.out_dir / "quarantine.json").read_text()
    assert "person" not in text and "stray" not in text and "notes" not in text and "healthy/" not in text


def test_decode_image_bytes_matches_png_content(sample_export):
    import io

    from PIL import Image

    img = (np.arange(64 * 48, dtype=np.uint32) % 256).astype(np.uint8).reshape(48, 64)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    np.testing.assert_allclose(decode_image_bytes(buf.getvalue()), img / 255.0, atol=1e-7)


# --- salt and pseudonyms ----------------------------------------------------------------


def test_salt_file_created_once_private_and_env_wins(tmp_path, monkeypatch):
    params, _ = _params(tmp_path, tmp_path, tmp_path / "l.csv", **{"data.salt_env": "RADSYNTH_TEST_SALT_VAR"})
    monkeypatch.delenv("RADSYNTH_TEST_SALT_VAR", raising=False)
    salt_path = Path(params.data.salt_file)
    salt_path.unlink(missing_ok=True)
    first = load_salt(params.data)
    assert salt_path.is_file() and (salt_path.stat().st_mode & 0o077) == 0 and len(first) >= 32
    assert load_salt(params.data) == first
    monkeypatch.setenv("RADSYNTH_TEST_SALT_VAR", "from-the-environment-123")
    assert load_salt(params.data) == b"from-the-environment-123"


def test_pseudonyms_are_salted_one_way_and_typed():
    a = pseudonym(b"salt-one-xxxxxxxxxxxx", "patient", "GZ0000124")
    assert a == pseudonym(b"salt-one-xxxxxxxxxxxx", "patient", " GZ0000124 ")
    assert a != pseudonym(b"salt-two-xxxxxxxxxxxx", "patient", "GZ0000124")
    assert a != pseudonym(b"salt-one-xxxxxxxxxxxx", "study", "GZ0000124")
    assert len(a) == 20 and int(a, 16) >= 0 and "GZ" not in a


def test_an_unexpected_decoder_failure_is_a_quarantine_entry_not_a_crash():
    from components import ingest as ingest_module
    from radsynth.deid import Rejected

    def boom(ctx, task):
        raise KeyError("GZ0000124")  # the message may carry header values: it must not be echoed

    params = load_params(ROOT / "params.yaml", profile="tiny")
    ctx = ingest_module.WorkerContext.from_config(params.data, Pseudonyms(b"s" * 32))
    res = ingest_module._guarded(boom, ctx, (0, "/x/GZ0000124/A1.dcm", "GZ0000124/A1.dcm"))
    assert isinstance(res, Rejected) and res.entry.reason == "unreadable" and res.entry.kind == "file"
    assert "GZ0000124" not in json.dumps(res.entry.as_dict())


# --- hostile files, crashes, hangs, quality outliers, salts -----------------------------


def test_hostile_dicom_is_quarantined_by_reason_before_decoding_and_never_echoed(tmp_path, sample_export):
    from tests.radsynth import hostile

    dicom, studies = _mini_export(tmp_path, sample_export, n=4)
    bad = dicom / "hostile"
    bad.mkdir()
    files = {
        "bomb.dcm": (hostile.deflate_bomb, "too_large"),
        "lie.dcm": (hostile.j2k_size_lie, "inconsistent"),
        "tiny.dcm": (lambda: hostile.tiny(8, 8), "too_small"),
        "burned.dcm": (hostile.burned_in, "burned_in_annotation"),
        "name.dcm": (hostile.frames_is_a_name, "unreadable"),
        "video.dcm": (hostile.unsupported_compression, "unsupported"),
        "giga.dcm": (hostile.huge_header, "too_large"),
        "rle.dcm": (hostile.rle_wrong_segments, "inconsistent"),
    }
    for name, (make, _) in files.items():
        (bad / name).write_bytes(make())
    labels = _write_labels(tmp_path / "labels.csv", [(a, y) for _, a, y in studies])
    params, _ = _params(tmp_path, dicom, labels, **{"data.workers": 2, "data.img_resolution": 16,
                                                    "data.allowed_body_parts": [], "data.max_image_pixels": 2048 * 2048})
    result = ingest(params, progress=False)
    report = json.loads((result.out_dir / "quarantine.json").read_text())
    want = Counter(reason for _, reason in files.values())
    assert {k: v for k, v in report["counts"].items() if v} == dict(want)
    assert result.num_images == len(studies)
    text = b"".join(p.read_bytes() for p in result.out_dir.iterdir())
    for value in hostile.identifiers():
        assert value.encode() not in text


def _fifo_task(tmp_path: Path) -> tuple[int, str, str]:
    import os

    fifo = tmp_path / "GZ0000124" / "A99999999.dcm"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a real hang
    return (0, str(fifo), "GZ0000124/A99999999.dcm")


def _ingest_tasks(tmp_path, sample_export, params, first) -> list[tuple[int, str, str]]:
    _, studies = _mini_export(tmp_path, sample_export, n=3)
    root = Path(params.data.dicom_dir)
    return [first] + [(i + 1, str(p), p.relative_to(root).as_posix()) for i, (p, _, _) in enumerate(studies)]


def test_a_record_that_hangs_is_quarantined_as_timeout_and_the_run_goes_on(tmp_path, sample_export):
    from components.ingest import WorkerContext, _process_dicom, _run_workers
    from radsynth.deid import Decoded, Rejected
    from tqdm import tqdm

    params, _ = _params(tmp_path, tmp_path / "export" / "dicom", tmp_path / "l.csv")
    tasks = _ingest_tasks(tmp_path, sample_export, params, _fifo_task(tmp_path / "fifo"))
    ctx = WorkerContext.from_config(params.data, Pseudonyms(TEST_SALT.encode()))
    results = _run_workers(_process_dicom, tasks, ctx, 1, False, tqdm, timeout_s=1.5)
    assert isinstance(results[0], Rejected) and results[0].entry.reason == "timeout"
    assert "A99999999" not in json.dumps(results[0].entry.as_dict()) and "GZ0000124" not in json.dumps(results[0].entry.as_dict())
    assert all(isinstance(r, Decoded) for r in results[1:])


def test_a_worker_killed_mid_record_is_a_quarantine_entry_not_a_hang(tmp_path, sample_export):
    import os
    import signal
    import threading
    import time

    import psutil

    from components.ingest import WorkerContext, _process_dicom, _run_workers
    from radsynth.deid import Decoded, Rejected
    from tqdm import tqdm

    params, _ = _params(tmp_path, tmp_path / "export" / "dicom", tmp_path / "l.csv")
    tasks = _ingest_tasks(tmp_path, sample_export, params, _fifo_task(tmp_path / "fifo"))
    ctx = WorkerContext.from_config(params.data, Pseudonyms(TEST_SALT.encode()))
    killed = []

    def kill_the_blocked_worker():  # as the OOM killer would; only our own child, found by what it waits on
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for child in psutil.Process().children():
                try:
                    if open(f"/proc/{child.pid}/wchan").read() in ("wait_for_partner", "fifo_open", "pipe_wait"):
                        os.kill(child.pid, signal.SIGKILL)
                        killed.append(child.pid)
                except OSError:
                    continue
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_blocked_worker)
    killer.start()
    results = _run_workers(_process_dicom, tasks, ctx, 1, False, tqdm, timeout_s=120)
    killer.join()
    assert killed
    assert isinstance(results[0], Rejected) and results[0].entry.reason == "worker_crashed"
    assert "SIGKILL" in results[0].entry.detail
    assert all(isinstance(r, Decoded) for r in results[1:])


def test_free_text_labels_never_become_classes_or_outputs(tmp_path, sample_export):
    dicom, studies = _mini_export(tmp_path, sample_export, n=5)
    rows = [(a, y) for _, a, y in studies]
    free_text = ["Smith John", "DOE.JANE", "1970-01-01", "see report: PNEUMONIA"]
    for i, text in enumerate(free_text, start=1):
        rows[i] = (rows[i][0], text)
    labels = _write_labels(tmp_path / "labels.csv", rows)
    params, _ = _params(tmp_path, dicom, labels, **{"data.workers": 1})
    result = ingest(params, progress=False)
    assert result.quarantine == {"unknown_label": 4} and result.num_images == 1
    text = "".join(p.read_text() for p in result.out_dir.iterdir() if p.suffix in (".csv", ".json", ".yaml"))
    for value in free_text:
        assert value not in text


def _with_pixels(path: Path, value: int) -> bytes:
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((int(ds.Rows), int(ds.Columns)), value, dtype=np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for tag in ("WindowCenter", "WindowWidth"):
        if tag in ds:
            delattr(ds, tag)
    ds.PhotometricInterpretation = "MONOCHROME2"
    import io

    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_quality_outliers_are_quarantined_and_the_dataset_still_validates(tmp_path, sample_export):
    from components.preprocess import preprocess
    from components.validate import validate

    dicom, studies = _mini_export(tmp_path, sample_export, n=24)
    black, flat = studies[0][0], studies[1][0]
    black.write_bytes(_with_pixels(black, 0))
    flat.write_bytes(_with_pixels(flat, 128))
    labels = _write_labels(tmp_path / "labels.csv", [(a, y) for _, a, y in studies])
    params, _ = _params(tmp_path, dicom, labels, **{"data.workers": 1, "data.min_class_fraction": 0.0,
                                                    "data.split_train": 0.5, "data.split_val": 0.25, "data.split_test": 0.25,
                                                    "data.max_quality_fraction": 0.1})
    result = ingest(params, progress=False)
    assert result.quarantine == {"near_black": 1, "blank": 1} and result.num_images == 22
    preprocess(params)
    ok = validate(params)
    assert ok.success, ok.failed
    # dataset-level: more quality drops than data.max_quality_fraction allows fails validation
    strict = dataclasses.replace(params, data=dataclasses.replace(params.data, max_quality_fraction=0.05))
    failed = validate(strict, out_dir=tmp_path / "strict")
    assert not failed.success and failed.failed == ("quarantine: expect_column_values_to_be_between(quality_fraction)",)


@pytest.mark.parametrize("value, words", [
    ("change-me", "has 9 characters"),
    ("change-me-change-me-change-me", "placeholder"),
    ("please-replace-me-with-a-secret", "placeholder"),
    ("abababababababababab", "distinct characters"),
    ("   ", "set but empty"),
])
def test_salt_from_the_environment_is_checked_like_the_file(tmp_path, monkeypatch, value, words):
    from radsynth.deid import SaltError

    params, _ = _params(tmp_path, tmp_path, tmp_path / "l.csv", **{"data.salt_env": "RADSYNTH_TEST_SALT_VAR"})
    monkeypatch.setenv("RADSYNTH_TEST_SALT_VAR", value)
    with pytest.raises(SaltError, match=words) as err:
        load_salt(params.data)
    assert value.strip() == "" or value not in str(err.value)  # the salt is never quoted


def test_salt_file_placeholder_is_refused_and_cli_says_so(tmp_path, sample_export):
    dicom, studies = _mini_export(tmp_path, sample_export, n=2)
    labels = _write_labels(tmp_path / "labels.csv", [(a, y) for _, a, y in studies])
    _, sets = _params(tmp_path, dicom, labels)
    (tmp_path / "salt").write_text("change-me-change-me\n")
    code, out = run_cli("ingest", sets)
    assert code == 2 and "placeholder" in out and "Traceback" not in out and "change-me" not in out


def _sample_tasks(step: int = 50):
    """Every ``step``-th file of the sample export plus the two truncated and the two non-chest ones."""
    from components.ingest import _list_files

    tasks = _list_files(ROOT / "data" / "dicom")
    odd = {"GZ0647447/A20160077.dcm", "GZ8946136/A25893433.dcm", "GZ9000000/X00000001.dcm", "GZ9000001/X00000002.dcm"}
    chosen = tasks[::step] + [t for t in tasks if t[2] in odd]
    assert {t[2] for t in chosen} >= odd
    return chosen


def test_each_sample_file_is_parsed_once_header_checked_before_its_pixel_data(sample_export, monkeypatch):
    """The ingest worker parses each file's meta and each of its elements once (the header pass's
    dataset goes on to the pixel data), and Pixel Data is parsed only after the header checks:
    never for a file refused by its header (the CT and the MR)."""
    import components.ingest as ci
    import radsynth.dicom as dicom
    from tests.radsynth.parse_log import install

    params = load_params(ROOT / "params.yaml", profile="cpu")
    ctx = ci.WorkerContext.from_config(params.data, Pseudonyms(TEST_SALT.encode()))
    log = install(monkeypatch)
    real_check = dicom.check_header

    def check_header(*args, **kwargs):
        log.mark("header_checked")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(dicom, "check_header", check_header)
    outcomes = Counter()
    for task in _sample_tasks():
        log.clear()
        result = ci._process_dicom(ctx, task)
        outcome = "decoded" if isinstance(result, ci.Decoded) else result.entry.reason
        outcomes[outcome] += 1
        assert log.meta_reads == 1, (task[2], log.meta_reads)
        assert not log.reparsed, (task[2], log.reparsed[:5])
        pixels = log.pixel_reads()
        if outcome == "wrong_modality":
            assert pixels == [] and "header_checked" not in [e[0] for e in log.events]
        elif outcome == "decoded":
            assert len(pixels) == 1 and log.first("header_checked") < pixels[0]
        assert len(log.elements) > 20  # the wrapper saw the whole header: it counts what it should
    assert outcomes["decoded"] >= 100 and outcomes["unreadable"] == 2 and outcomes["wrong_modality"] == 2


def test_the_parse_counter_can_fail(sample_export, monkeypatch):
    """Control: a header-only read then a full read of the same file (the two-pass reading this
    replaced) shows up as two file-meta reads and every header element parsed twice."""
    from tests.radsynth.parse_log import install

    path = ROOT / "data" / "dicom" / "GZ0000124" / "A12716217.dcm"
    log = install(monkeypatch)
    read_dicom(path, stop_before_pixels=True)
    assert log.meta_reads == 1 and not log.reparsed
    read_dicom(path)
    assert log.meta_reads == 2
    assert len(log.reparsed) == len(log.elements) - 1 > 20  # all but Pixel Data, read by the second pass only
