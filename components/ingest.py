"""Step ``ingest``: a hospital export in, decoded de-identified images out.

Inputs (``params.data.source``):

* ``dicom``: ``data.dicom_dir`` (any depth of sub-folders, any file names) and
  ``data.labels_csv`` with columns ``accession_number,label`` (the sample's shape:
  ``data/dicom/<PatientID>/<Accession>.dcm``).
* ``folders``: ``data.image_dir/<class>/<image>.png|jpg`` (as many public data sets come).
  Patients come from ``data.folder_patient_regex`` applied to the file name (first group, or
  the whole match); without it every image is its own patient.

Output ``<artifacts>/ingest/`` (written atomically)::

    images.npy        uint8 [N, C, R, R], R = data.img_resolution (imaging.prepare)
    manifest.csv      index,study,patient,label    (study/patient: salted HMAC-SHA256 pseudonyms)
    quarantine.json   {"counts": {reason: n}, "total": n, "entries": [{record, kind, reason, detail}]}
    ingest.json       run summary (counts, classes, throughput; no identifying values)
    params.yaml       the resolved config

Nothing identifying leaves this step: no names, IDs, dates, accession numbers, UIDs,
institutions, physicians or source paths appear in any output, file name or log line. Every
identifier is replaced by ``HMAC-SHA256(salt, kind || value)`` (first 20 hex digits); the
salt comes from ``$<data.salt_env>`` or the git-ignored ``data.salt_file`` (created once, mode
0600). Losing the salt only changes pseudonyms (and so the split), never the images. No DICOM
is written, so nothing needs re-identification-proof header scrubbing downstream.

A record that cannot be used is quarantined with a reason, never dropped silently and never
fatal; a missing, empty or malformed labels file is fatal (:class:`IngestError`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import multiprocessing as mp
import os
import re
import secrets
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from radsynth.config import DataConfig, Params
from radsynth.errors import RadsynthError

STEP = "ingest"
LABEL_COLUMNS = ("accession_number", "label")
MANIFEST_COLUMNS = ("index", "study", "patient", "label")
PSEUDONYM_HEX = 20

# Every quarantine reason, with what it means (the report always lists all of them).
REASONS: dict[str, str] = {
    "not_dicom": "file is not DICOM (no preamble and no DICOM image header)",
    "unreadable": "file or its pixel data is truncated, corrupt or cannot be opened",
    "no_pixel_data": "DICOM object without an image (report, SR, ...)",
    "multi_frame": "more than one frame in one object",
    "colour": "colour / palette image; radiographs are grayscale",
    "wrong_modality": "Modality not in data.allowed_modalities",
    "wrong_body_part": "BodyPartExamined missing or not in data.allowed_body_parts",
    "no_patient_id": "no PatientID, so the patient-level split is impossible",
    "no_accession": "no AccessionNumber, so no label can be joined",
    "not_image": "file in an image folder is not a PNG/JPEG (checked by content)",
    "too_large": "image above the decompression-bomb pixel cap",
    "no_label": "study has no row in the labels file (or is outside a class folder)",
    "unknown_label": "label not in data.classes, or not a plausible class name",
    "conflicting_labels": "labels file gives one study different labels",
    "duplicate_label_row": "same accession and label repeated in the labels file",
    "bad_label_row": "labels row with an empty accession number",
    "label_without_study": "labels row whose study is not in the export",
    "duplicate_image": "exact duplicate of an image kept earlier (same decoded pixels)",
    "duplicate_conflicting_labels": "identical images carry different labels: all of them quarantined",
}

_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\- ]{0,63}$")
_CODE = re.compile(r"^[A-Z0-9 _]{1,16}$")


class IngestError(RadsynthError, ValueError):
    """The export as a whole cannot be ingested (labels file missing/empty/malformed, no images)."""


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What one ingest run produced."""

    out_dir: Path
    num_images: int
    num_patients: int
    classes: tuple[str, ...]
    class_counts: dict[str, int]
    quarantine: dict[str, int]                 # reason -> count (only non-zero reasons)
    num_records: int                           # files seen (studies)
    seconds: float                             # decode + write wall time
    studies_per_s: float
    workers: int


# --------------------------------------------------------------------------------------
# Pseudonyms
# --------------------------------------------------------------------------------------


def load_salt(cfg: DataConfig, root: str | os.PathLike = ".") -> bytes:
    """The pseudonym salt: ``$<cfg.salt_env>``, else ``cfg.salt_file`` (created once, 0600).

    The salt never appears in any output; keep the file out of git (it is ignored).
    """
    env = os.environ.get(cfg.salt_env, "") if cfg.salt_env else ""
    if env:
        return env.encode()
    path = Path(root) / cfg.salt_file
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    salt = path.read_text().strip()
    if len(salt) < 16:
        raise IngestError(f"{cfg.salt_file}: salt is shorter than 16 characters; delete it to create a new one or set ${cfg.salt_env}")
    return salt.encode()


def pseudonym(salt: bytes, kind: str, value: str) -> str:
    """One-way salted pseudonym of an identifier: ``HMAC-SHA256(salt, kind NUL value)[:20]``."""
    return hmac.new(salt, f"{kind}\x00{value.strip()}".encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


# --------------------------------------------------------------------------------------
# Labels file
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Labels:
    by_study: dict[str, str]                   # study pseudonym -> label
    conflicting: set[str]                      # study pseudonyms with contradictory rows
    quarantine: list[dict]                     # duplicate / bad rows


def read_labels(path: str | os.PathLike, salt: bytes) -> _Labels:
    """Read ``accession_number,label`` rows, keyed by study pseudonym.

    Raises:
        IngestError: the file is missing, empty, not UTF-8 CSV, lacks a column, or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"labels file {path} not found; set data.labels_csv (columns: {', '.join(LABEL_COLUMNS)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(f"labels file {path} is not UTF-8 text; save it as UTF-8 CSV") from None
    if not text.strip():
        raise IngestError(f"labels file {path} is empty; it needs a header {','.join(LABEL_COLUMNS)} and one row per study")
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in LABEL_COLUMNS if c not in header]
        if missing:
            raise IngestError(
                f"labels file {path} has no column {missing[0]!r} (found {len(header)} columns); "
                f"the header must be {','.join(LABEL_COLUMNS)}"
            )
        reader.fieldnames = header
        rows = list(reader)
    except csv.Error as exc:
        raise IngestError(f"labels file {path} is not valid CSV ({exc}); fix the quoting or delimiter") from None
    if not rows:
        raise IngestError(f"labels file {path} has a header but no rows; add one row per study")

    out = _Labels({}, set(), [])
    for number, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        accession = (row.get("accession_number") or "").strip()
        label = (row.get("label") or "").strip()
        if not accession:
            out.quarantine.append(_entry(f"line-{number}", "label_row", "bad_label_row", "empty accession_number"))
            continue
        study = pseudonym(salt, "study", accession)
        if study in out.by_study:
            if out.by_study[study] == label:
                out.quarantine.append(_entry(study, "label_row", "duplicate_label_row", f"labels line {number} repeats a row"))
            else:
                out.conflicting.add(study)
            continue
        out.by_study[study] = label
    return out


# --------------------------------------------------------------------------------------
# Workers (run in child processes; they return pseudonyms and pixels, never raw identifiers)
# --------------------------------------------------------------------------------------

_CTX: dict[str, Any] = {}


def _init_worker(ctx: dict[str, Any]) -> None:
    _CTX.clear()
    _CTX.update(ctx)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)  # its messages can quote headers
    warnings.simplefilter("ignore")


def _entry(record: str, kind: str, reason: str, detail: str) -> dict:
    return {"record": record, "kind": kind, "reason": reason, "detail": detail}


def _code(value: Any) -> str:
    """A header code value fit for a report (CS-like), or a placeholder."""
    text = str(value or "").strip().upper()
    return text if _CODE.match(text) else ("missing" if not text else "unrecognised value")


def _finish(img01: np.ndarray) -> tuple[np.ndarray, str]:
    from radsynth.imaging import prepare

    native = np.rint(np.asarray(img01, dtype=np.float32) * 255.0).astype(np.uint8)  # [H, W]
    digest = hashlib.sha256(np.asarray(native.shape, dtype=np.int64).tobytes() + native.tobytes()).hexdigest()
    return prepare(img01, _CTX["resolution"], _CTX["channels"]), digest


def _process_dicom(task: tuple[int, str, str]) -> dict:
    return _guarded(_process_dicom_unsafe, task)


def _process_image(task: tuple[int, str, str]) -> dict:
    return _guarded(_process_image_unsafe, task)


def _guarded(worker, task: tuple[int, str, str]) -> dict:
    """A record never stops the run: anything unexpected becomes an ``unreadable`` entry."""
    try:
        return worker(task)
    except Exception as exc:  # a codec or parser bug on one odd file
        record = pseudonym(_CTX["salt"], "file", task[2])
        return {"ok": False, **_entry(record, "file", "unreadable", f"unexpected {type(exc).__name__} while decoding"), "study_hint": None}


def _process_dicom_unsafe(task: tuple[int, str, str]) -> dict:
    from radsynth.imaging import ImageError, dicom_to_array, read_dicom

    _, path, rel = task
    salt = _CTX["salt"]
    file_key = pseudonym(salt, "file", rel)
    # The sample names files <Accession>.dcm: a stem lets a label row find an unparseable file.
    hint = pseudonym(salt, "study", Path(rel).stem)
    try:
        ds = read_dicom(path)
    except ImageError as exc:
        return {"ok": False, **_entry(file_key, "file", exc.reason, str(exc)), "study_hint": hint}
    accession = str(ds.get("AccessionNumber", "") or "").strip()
    patient_id = str(ds.get("PatientID", "") or "").strip()
    record, kind = (pseudonym(salt, "study", accession), "study") if accession else (file_key, "file")
    base = {"study_hint": record if accession else hint}

    def reject(reason: str, detail: str) -> dict:
        return {"ok": False, **_entry(record, kind, reason, detail), **base}

    modality = str(ds.get("Modality", "") or "").strip().upper()
    if _CTX["modalities"] and modality not in _CTX["modalities"]:
        return reject("wrong_modality", f"modality {_code(modality)} not in {list(_CTX['modalities'])}")
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if _CTX["body_parts"] and body not in _CTX["body_parts"]:
        return reject("wrong_body_part", f"body part {_code(body)} not in {list(_CTX['body_parts'])}")
    if not patient_id:
        return reject("no_patient_id", "PatientID is empty")
    if not accession:
        return reject("no_accession", "AccessionNumber is empty")
    try:
        image, digest = _finish(dicom_to_array(ds))
    except ImageError as exc:
        return reject(exc.reason, str(exc))
    return {"ok": True, "record": record, "kind": "study", "patient": pseudonym(salt, "patient", patient_id), "image": image, "digest": digest, **base}


def _process_image_unsafe(task: tuple[int, str, str]) -> dict:
    from radsynth.imaging import ImageError, decode_image_bytes

    _, path, rel = task
    salt = _CTX["salt"]
    record = pseudonym(salt, "file", rel)
    parts = Path(rel).parts
    label = parts[0] if len(parts) > 1 else ""
    base = {"record": record, "kind": "file", "study_hint": None, "folder_label": label}
    try:
        data = Path(path).read_bytes()
        img01 = decode_image_bytes(data, max_pixels=_CTX["max_pixels"])
        image, digest = _finish(img01)
    except OSError as exc:
        return {"ok": False, **base, "reason": "unreadable", "detail": f"cannot read the file ({type(exc).__name__})"}
    except ImageError as exc:
        return {"ok": False, **base, "reason": exc.reason, "detail": str(exc)}
    stem = Path(rel).stem
    regex = _CTX["patient_regex"]
    match = re.search(regex, stem) if regex else None
    key = (match.group(1) if match and match.groups() else match.group(0)) if match else rel
    return {"ok": True, **base, "patient": pseudonym(salt, "patient", key), "image": image, "digest": digest}


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def resolve_workers(requested: int) -> int:
    """``0`` means every core this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _list_files(root: Path) -> list[tuple[int, str, str]]:
    """Every regular file under ``root`` (any name: DICOM files often have no extension)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [(i, str(p), p.relative_to(root).as_posix()) for i, p in enumerate(files)]


def ingest(params: Params, out_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True) -> IngestResult:
    """Decode, de-identify, label-join and quarantine an export into ``<artifacts>/ingest``.

    Args:
        params: the resolved config (``data`` section and ``paths.artifacts``).
        out_dir: output directory (default ``<paths.artifacts>/ingest``).
        workers: processes (default ``data.workers``; 0 = all cores).
        progress: show a progress bar on stderr.

    Returns:
        The :class:`IngestResult` (also written as ``ingest.json``).

    Raises:
        IngestError: the input folder or labels file is missing/empty/malformed, or no image
            survived (the quarantine report is still written to say why).
    """
    from tqdm import tqdm

    from radsynth.tracking import data_version

    cfg = params.data
    out_dir = Path(out_dir or Path(params.paths.artifacts) / STEP)
    n_workers = resolve_workers(cfg.workers if workers is None else workers)
    salt = load_salt(cfg)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

    if cfg.source == "dicom":
        root = Path(cfg.dicom_dir)
        if not root.is_dir():
            raise IngestError(f"DICOM folder {cfg.dicom_dir} not found; run `dvc pull data.dvc` or set data.dicom_dir")
        labels = read_labels(cfg.labels_csv, salt)
        tasks, worker = _list_files(root), _process_dicom
    elif cfg.source == "folders":
        root = Path(cfg.image_dir)
        if not cfg.image_dir or not root.is_dir():
            raise IngestError(f"image folder {cfg.image_dir!r} not found; set data.image_dir to a folder of class sub-folders")
        labels = None
        tasks, worker = _list_files(root), _process_image
    else:
        raise IngestError(f"data.source must be 'dicom' or 'folders', got {cfg.source!r}")
    if not tasks:
        raise IngestError(f"no files under {root}; is the export there (dvc pull data.dvc)?")

    ctx = {
        "salt": salt,
        "resolution": cfg.img_resolution,
        "channels": cfg.img_channels,
        "modalities": tuple(m.upper() for m in cfg.allowed_modalities),
        "body_parts": tuple(b.upper() for b in cfg.allowed_body_parts),
        "max_pixels": cfg.max_image_pixels,
        "patient_regex": cfg.folder_patient_regex,
    }
    start = time.perf_counter()
    results = _run_workers(worker, tasks, ctx, n_workers, progress, tqdm)
    decode_s = time.perf_counter() - start

    kept, quarantine, class_names = _assemble(results, labels, cfg)
    if not kept:
        _write_outputs(out_dir, params, [], quarantine, class_names, cfg, {})
        raise IngestError(f"no usable image among {len(tasks)} files; see {out_dir / 'quarantine.json'} for the reasons")

    images = np.stack([r["image"] for r in kept])  # [N, C, R, R]
    counts = Counter(q["reason"] for q in quarantine)
    class_counts = {c: sum(r["label"] == c for r in kept) for c in class_names}
    summary = {
        "step": STEP,
        "source": cfg.source,
        "data_md5": data_version(),
        "num_records": len(tasks),
        "num_images": len(kept),
        "num_patients": len({r["patient"] for r in kept}),
        "classes": list(class_names),
        "class_counts": class_counts,
        "img_resolution": cfg.img_resolution,
        "img_channels": cfg.img_channels,
        "quarantine": {k: counts.get(k, 0) for k in REASONS},
        "quarantine_total": len(quarantine),
        "workers": n_workers,
        "decode_seconds": round(decode_s, 3),
        "studies_per_s": round(len(tasks) / max(decode_s, 1e-9), 1),
    }
    _write_outputs(out_dir, params, kept, quarantine, class_names, cfg, summary, images)
    seconds = time.perf_counter() - start
    return IngestResult(
        out_dir=out_dir,
        num_images=len(kept),
        num_patients=summary["num_patients"],
        classes=tuple(class_names),
        class_counts=class_counts,
        quarantine={k: v for k, v in counts.items() if v},
        num_records=len(tasks),
        seconds=seconds,
        studies_per_s=summary["studies_per_s"],
        workers=n_workers,
    )


def _run_workers(worker, tasks, ctx, n_workers, progress, tqdm) -> list[dict]:
    bar = tqdm(total=len(tasks), desc=STEP, unit="study", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    results: list[dict] = []
    try:
        if n_workers == 1:
            with warnings.catch_warnings():
                _init_worker(ctx)
                for task in tasks:
                    results.append(worker(task))
                    bar.update()
            _CTX.clear()  # the salt does not outlive the run in this process
        else:
            chunk = max(1, min(64, len(tasks) // (n_workers * 8)))
            with mp.get_context().Pool(n_workers, initializer=_init_worker, initargs=(ctx,)) as pool:
                for res in pool.imap(worker, tasks, chunksize=chunk):
                    results.append(res)
                    bar.update()
    finally:
        bar.close()
    return results


def _assemble(results: list[dict], labels: _Labels | None, cfg: DataConfig) -> tuple[list[dict], list[dict], list[str]]:
    """Join labels, drop duplicates, and decide the class list; every drop is quarantined."""
    quarantine: list[dict] = []
    wanted = tuple(cfg.classes)
    ok: list[dict] = []
    seen_studies: set[str] = set()
    for res in results:
        if res.get("study_hint"):
            seen_studies.add(res["study_hint"])
        if not res["ok"]:
            quarantine.append(_entry(res["record"], res["kind"], res["reason"], res["detail"]))
            continue
        if labels is not None:
            study = res["record"]
            if study in labels.conflicting:
                quarantine.append(_entry(study, "study", "conflicting_labels", "labels file gives this study different labels"))
                continue
            label = labels.by_study.get(study)
            if label is None:
                quarantine.append(_entry(study, "study", "no_label", "no row in the labels file"))
                continue
        else:
            label = res["folder_label"]
            if not label:
                quarantine.append(_entry(res["record"], res["kind"], "no_label", "image is not inside a class sub-folder"))
                continue
        if not _CLASS_NAME.match(label) or (wanted and label not in wanted):
            detail = f"label {label!r} not in data.classes {list(wanted)}" if _CLASS_NAME.match(label) else "label is not a plausible class name"
            quarantine.append(_entry(res["record"], res["kind"], "unknown_label", detail))
            continue
        ok.append({**res, "label": label})

    if labels is not None:
        quarantine.extend(labels.quarantine)
        for study in sorted(set(labels.by_study) - seen_studies):
            quarantine.append(_entry(study, "label_row", "label_without_study", "labels row names a study that is not in the export"))

    # Output order follows the pseudonyms, so it reveals nothing about accession order.
    ok.sort(key=lambda r: r["record"])
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        groups[r["digest"]].append(r)
    kept = []
    for r in ok:
        group = groups[r["digest"]]
        if len(group) == 1:
            kept.append(r)
        elif len({g["label"] for g in group}) > 1:
            quarantine.append(_entry(r["record"], r["kind"], "duplicate_conflicting_labels", f"{len(group)} identical images with different labels"))
        elif r is group[0]:
            kept.append(r)
        else:
            quarantine.append(_entry(r["record"], r["kind"], "duplicate_image", f"same decoded pixels as record {group[0]['record']}"))

    class_names = list(wanted) if wanted else sorted({r["label"] for r in kept})
    quarantine.sort(key=lambda q: (q["reason"], q["record"]))
    return kept, quarantine, class_names


def _write_outputs(out_dir, params, kept, quarantine, class_names, cfg, summary, images=None) -> None:
    from radsynth.io import atomic_dir

    counts = Counter(q["reason"] for q in quarantine)
    report = {
        "counts": {k: counts.get(k, 0) for k in REASONS},
        "total": len(quarantine),
        "reasons": REASONS,
        "entries": quarantine,
    }
    with atomic_dir(out_dir) as tmp:
        if images is None:
            images = np.zeros((0, cfg.img_channels, cfg.img_resolution, cfg.img_resolution), dtype=np.uint8)
        np.save(tmp / "images.npy", images)
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for i, r in enumerate(kept):
                writer.writerow((i, r["record"], r["patient"], r["label"]))
        (tmp / "quarantine.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "ingest.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        params.save(tmp / "params.yaml")


def format_summary(result: IngestResult) -> str:
    """The run summary printed by the CLI (counts only; nothing identifying)."""
    lines = [
        f"ingest: {result.num_images} images from {result.num_patients} patients "
        f"({result.num_records} files, {result.studies_per_s:.0f} studies/s on {result.workers} processes) -> {result.out_dir}",
        "  classes: " + ", ".join(f"{c} {n}" for c, n in result.class_counts.items()),
        f"  quarantined: {sum(result.quarantine.values())}" + ("" if result.quarantine else " (none)"),
    ]
    lines += [f"    {reason:<30} {n:>6}" for reason, n in sorted(result.quarantine.items())]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: <paths.artifacts>/ingest)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: data.workers; 0 = all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    result = ingest(params, out_dir=args.out, workers=args.workers, progress=not args.no_progress)
    print(format_summary(result))
    return 0


# --------------------------------------------------------------------------------------
# Kubeflow component: the same function in the project image (pipelines/radsynth_pipeline.py)
# --------------------------------------------------------------------------------------
from kfp.dsl import Artifact, Metrics, Output  # noqa: E402

from pipelines.component import step_component  # noqa: E402


@step_component
def ingest_component(profile: str, overrides: list, raw_dir: str, ingest: Output[Artifact], metrics: Output[Metrics]):
    """KFP: decode and de-identify the export under ``raw_dir`` into the ``ingest`` artefact."""
    from components.ingest import format_summary
    from components.ingest import ingest as run_ingest
    from pipelines.workspace import raw_overrides, step_workspace

    moved = raw_overrides(profile, overrides, raw_dir)
    with step_workspace(profile, overrides, outputs={"ingest": ingest.path}, metrics=metrics,
                        metrics_file="ingest.json", extra_overrides=moved) as ws:
        print(format_summary(run_ingest(ws.params)))
