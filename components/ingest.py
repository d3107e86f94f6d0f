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
identifier is replaced by a salted one-way pseudonym (:class:`radsynth.deid.Pseudonyms`, which
also says where the site salt comes from and how it is checked); the decoding processes get
that object, never the salt. Losing the salt only changes pseudonyms (and so the split), never
the images. No DICOM is written, so nothing needs re-identification-proof header scrubbing downstream. Labels
become class names only when they look like one (``[A-Za-z][A-Za-z0-9_-]*``); header text is
never copied (reasons quote standard codes only).

Every DICOM goes through :func:`radsynth.dicom.read_guarded`: the file size
(``data.max_file_bytes``), a Deflated body, modality, body part, burned-in annotation, frames,
colour and ``Rows x Columns`` (``data.max_image_pixels``, at least ``data.img_resolution``) are
checked from the header, and a compressed codestream's own size, before any pixel is decoded.
Decoding runs in supervised worker processes (:func:`radsynth.pool.supervised_map`): a worker
that crashes on a file, or spends more than ``data.record_timeout_s`` on it, costs that record
(``worker_crashed`` / ``timeout``) and is replaced; the run goes on. A decoded image whose mean
or contrast is out of ``data.pixel_*`` is quarantined (``near_black``, ``near_white``,
``blank``) rather than failing validation of the whole dataset.

A record that cannot be used is quarantined with a reason, never dropped silently and never
fatal; a missing, empty or malformed labels file is fatal (:class:`IngestError`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from radsynth.config import DataConfig, Params
from radsynth.deid import Decoded, Entry, Pseudonyms, Record, Rejected
from radsynth.errors import RadsynthError

STEP = "ingest"
LABEL_COLUMNS = ("accession_number", "label")
MANIFEST_COLUMNS = ("index", "study", "patient", "label")

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
    "too_large": "file above data.max_file_bytes, image above data.max_image_pixels, or a Deflated body that inflates past the cap",
    "too_small": "image smaller than data.img_resolution on a side (it would be upscaled)",
    "inconsistent": "compressed codestream's size or components disagree with the header (not decoded)",
    "unsupported": "compression radsynth cannot size or decode (only JPEG 2000, JPEG, RLE)",
    "burned_in_annotation": "BurnedInAnnotation (0028,0301) is YES: identifying text may be in the pixels",
    "worker_crashed": "the decoding process died on this file (codec crash, out of memory); the run went on",
    "timeout": "decoding took longer than data.record_timeout_s; its process was stopped",
    "near_black": "decoded image's mean intensity below data.pixel_mean_min",
    "near_white": "decoded image's mean intensity above data.pixel_mean_max",
    "blank": "decoded image's contrast (std) below data.pixel_std_min",
    "no_label": "study has no row in the labels file (or is outside a class folder)",
    "unknown_label": "label not in data.classes, or not a plausible class name",
    "conflicting_labels": "labels file gives one study different labels",
    "duplicate_label_row": "same accession and label repeated in the labels file",
    "bad_label_row": "labels row with an empty accession number",
    "label_without_study": "labels row whose study is not in the export",
    "duplicate_image": "exact duplicate of an image kept earlier (same decoded pixels)",
    "duplicate_conflicting_labels": "identical images carry different labels: all of them quarantined",
}

_CLASS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,47}$")  # a class name, not free text (no spaces, dots, dates)
QUALITY_REASONS = ("near_black", "near_white", "blank")


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
# Labels file
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Labels:
    by_study: dict[str, str]                   # study pseudonym -> label
    conflicting: set[str]                      # study pseudonyms with contradictory rows
    quarantine: list[Entry]                    # duplicate / bad rows


def read_labels(path: str | os.PathLike, ids: Pseudonyms) -> _Labels:
    """Read ``accession_number,label`` rows, keyed by study pseudonym (``ids.study``).

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
            out.quarantine.append(Entry(f"line-{number}", "label_row", "bad_label_row", "empty accession_number"))
            continue
        study = ids.study(accession)
        if study in out.by_study:
            if out.by_study[study] == label:
                out.quarantine.append(Entry(study, "label_row", "duplicate_label_row", f"labels line {number} repeats a row"))
            else:
                out.conflicting.add(study)
            continue
        out.by_study[study] = label
    return out


# --------------------------------------------------------------------------------------
# Workers (forked decoding processes; they return pseudonyms and pixels, never raw identifiers)
# --------------------------------------------------------------------------------------


class Task(NamedTuple):
    """One file of the export, as a decoding process receives it."""

    index: int                                 # position in the sorted file list
    path: str                                  # where to read it
    rel: str                                   # path below the export's root (pseudonymised, never output)


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """Everything a decoding process needs: handed to each worker call, inherited by the forked processes."""

    ids: Pseudonyms
    resolution: int
    channels: int
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    max_pixels: int
    max_file_bytes: int
    patient_regex: str
    pixel_mean_min: float = 0.0
    pixel_mean_max: float = 1.0
    pixel_std_min: float = 0.0

    @classmethod
    def from_config(cls, cfg: DataConfig, ids: Pseudonyms) -> "WorkerContext":
        return cls(ids=ids, resolution=cfg.img_resolution, channels=cfg.img_channels,
                   modalities=tuple(m.upper() for m in cfg.allowed_modalities),
                   body_parts=tuple(b.upper() for b in cfg.allowed_body_parts), max_pixels=cfg.max_image_pixels,
                   max_file_bytes=cfg.max_file_bytes, patient_regex=cfg.folder_patient_regex,
                   pixel_mean_min=cfg.pixel_mean_min, pixel_mean_max=cfg.pixel_mean_max, pixel_std_min=cfg.pixel_std_min)


class _Refused(Exception):
    """A header-stage refusal inside a worker: (reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _finish(ctx: WorkerContext, img01: np.ndarray) -> tuple[np.ndarray, str]:
    """(uint8 [C, R, R] training image, sha256 of the full-resolution 8-bit pixels); quality-checked."""
    from radsynth.imaging import prepare

    native = np.rint(np.asarray(img01, dtype=np.float32) * 255.0).astype(np.uint8)  # [H, W]
    digest = hashlib.sha256(np.asarray(native.shape, dtype=np.int64).tobytes() + native.tobytes()).hexdigest()
    del native
    image = prepare(img01, ctx.resolution, ctx.channels)
    scaled = image.astype(np.float32) / 255.0
    mean, std = float(scaled.mean()), float(scaled.std())
    if mean < ctx.pixel_mean_min:
        raise _Refused("near_black", f"mean intensity {mean:.3f} below data.pixel_mean_min {ctx.pixel_mean_min:g}")
    if mean > ctx.pixel_mean_max:
        raise _Refused("near_white", f"mean intensity {mean:.3f} above data.pixel_mean_max {ctx.pixel_mean_max:g}")
    if std < ctx.pixel_std_min:
        raise _Refused("blank", f"contrast (std) {std:.3f} below data.pixel_std_min {ctx.pixel_std_min:g}")
    return image, digest


Worker = Callable[[WorkerContext, Task], Record]


def _process_dicom(ctx: WorkerContext, task: Task) -> Record:
    return _guarded(_process_dicom_unsafe, ctx, task)


def _process_image(ctx: WorkerContext, task: Task) -> Record:
    return _guarded(_process_image_unsafe, ctx, task)


def _guarded(worker: Worker, ctx: WorkerContext, task: Task) -> Record:
    """A record never stops the run: anything unexpected becomes an ``unreadable`` entry."""
    try:
        return worker(ctx, task)
    except Exception as exc:  # a codec or parser bug on one odd file (its message may quote header values)
        _, _, rel = task
        return Rejected(Entry(ctx.ids.file(rel), "file", "unreadable", f"unexpected {type(exc).__name__} while decoding"), None)


def _process_dicom_unsafe(ctx: WorkerContext, task: Task) -> Record:
    from radsynth.dicom import BODY_PARTS, MODALITIES, ImageError, Limits, dicom_to_array, header_code, header_text, read_guarded

    _, path, rel = task
    file_key = ctx.ids.file(rel)
    # The sample names files <Accession>.dcm: a stem lets a label row find an unparseable file.
    hint = ctx.ids.study(Path(rel).stem)
    seen: dict[str, str] = {}

    def inspect(head) -> None:  # the header alone, before any image check or pixel read
        accession, patient_id = header_text(head, "AccessionNumber"), header_text(head, "PatientID")
        seen.update(accession=accession, patient=patient_id)
        modality = header_code(head, "Modality", MODALITIES | set(ctx.modalities))
        if ctx.modalities and modality not in ctx.modalities:
            raise _Refused("wrong_modality", f"modality {modality} not in {list(ctx.modalities)}")
        body = header_code(head, "BodyPartExamined", BODY_PARTS | set(ctx.body_parts))
        if ctx.body_parts and body not in ctx.body_parts:
            raise _Refused("wrong_body_part", f"body part {body} not in {list(ctx.body_parts)}")
        if header_code(head, "BurnedInAnnotation", frozenset(("YES", "NO"))) == "YES":
            raise _Refused("burned_in_annotation", "the header declares burned-in annotation (0028,0301) YES")
        if not patient_id:
            raise _Refused("no_patient_id", "PatientID is empty")
        if not accession:
            raise _Refused("no_accession", "AccessionNumber is empty")

    def rejected(reason: str, detail: str):
        accession = seen.get("accession", "")
        record, kind = (ctx.ids.study(accession), "study") if accession else (file_key, "file")
        return Rejected(Entry(record, kind, reason, detail), record if accession else hint)

    limits = Limits(max_pixels=ctx.max_pixels, min_side=ctx.resolution, max_bytes=ctx.max_file_bytes)
    try:
        checked = read_guarded(path, limits, inspect=inspect)
        image, digest = _finish(ctx, dicom_to_array(checked, limits))
    except _Refused as exc:
        return rejected(exc.reason, exc.detail)
    except ImageError as exc:
        return rejected(exc.reason, str(exc))
    study = ctx.ids.study(seen["accession"])
    return Decoded(study, "study", ctx.ids.patient(seen["patient"]), image, digest, study)


def _process_image_unsafe(ctx: WorkerContext, task: Task) -> Record:
    from radsynth.imaging import ImageError, decode_image_bytes

    _, path, rel = task
    record = ctx.ids.file(rel)
    parts = Path(rel).parts
    label = parts[0] if len(parts) > 1 else ""

    def rejected(reason: str, detail: str):
        return Rejected(Entry(record, "file", reason, detail), None)

    try:
        if os.stat(path).st_size > ctx.max_file_bytes:
            return rejected("too_large", f"file above data.max_file_bytes ({ctx.max_file_bytes / 2**20:.0f} MiB)")
        data = Path(path).read_bytes()
        img01 = decode_image_bytes(data, max_pixels=ctx.max_pixels)
        if min(img01.shape) < ctx.resolution:
            return rejected("too_small", f"image is {img01.shape[1]}x{img01.shape[0]} pixels, smaller than {ctx.resolution}")
        image, digest = _finish(ctx, img01)
    except OSError as exc:
        return rejected("unreadable", f"cannot read the file ({type(exc).__name__})")
    except ImageError as exc:
        return rejected(exc.reason, str(exc))
    except _Refused as exc:
        return rejected(exc.reason, exc.detail)
    stem = Path(rel).stem
    match = re.search(ctx.patient_regex, stem) if ctx.patient_regex else None
    key = (match.group(1) if match and match.groups() else match.group(0)) if match else rel
    return Decoded(record, "file", ctx.ids.patient(key), image, digest, None, folder_label=label)


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


def _list_files(root: Path) -> list[Task]:
    """Every regular file under ``root`` (any name: DICOM files often have no extension)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [Task(i, str(p), p.relative_to(root).as_posix()) for i, p in enumerate(files)]


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
    ids = Pseudonyms.load(cfg)

    if cfg.source == "dicom":
        root = Path(cfg.dicom_dir)
        if not root.is_dir():
            raise IngestError(f"DICOM folder {cfg.dicom_dir} not found; run `dvc pull data.dvc` or set data.dicom_dir")
        labels = read_labels(cfg.labels_csv, ids)
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

    ctx = WorkerContext.from_config(cfg, ids)
    start = time.perf_counter()
    results = _run_workers(worker, tasks, ctx, n_workers, progress, tqdm, cfg.record_timeout_s)
    decode_s = time.perf_counter() - start

    kept, quarantine, class_names = _assemble(results, labels, cfg)
    if not kept:
        _write_outputs(out_dir, params, [], quarantine, class_names, cfg, {})
        raise IngestError(f"no usable image among {len(tasks)} files; see {out_dir / 'quarantine.json'} for the reasons")

    images = np.stack([r.image for r, _ in kept])  # [N, C, R, R]
    counts = Counter(q.reason for q in quarantine)
    class_counts = {c: sum(label == c for _, label in kept) for c in class_names}
    summary = {
        "step": STEP,
        "source": cfg.source,
        "data_md5": data_version(),
        "num_records": len(tasks),
        "num_images": len(kept),
        "num_patients": len({r.patient for r, _ in kept}),
        "classes": list(class_names),
        "class_counts": class_counts,
        "img_resolution": cfg.img_resolution,
        "img_channels": cfg.img_channels,
        "quarantine": {k: counts.get(k, 0) for k in REASONS},
        "quarantine_total": len(quarantine),
        "quality_quarantined": sum(counts.get(k, 0) for k in QUALITY_REASONS),
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


def _run_workers(worker: Worker, tasks: list[Task], ctx: WorkerContext, n_workers: int, progress: bool, tqdm,
                 timeout_s: float) -> list[Record]:
    """Every task's record, in task order, from supervised processes (a crash or an overrun
    becomes that record's quarantine entry; see :mod:`radsynth.pool`). Each process inherits
    ``ctx`` with ``worker`` (they are forked): nothing is set up through module state."""
    from radsynth.dicom import quiet_pydicom
    from radsynth.pool import Failure, supervised_map

    bar = tqdm(total=len(tasks), desc=STEP, unit="study", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    results: list[Record | None] = [None] * len(tasks)
    chunk = max(1, min(64, len(tasks) // (n_workers * 8)))
    try:
        # quiet_pydicom: pydicom's log records and warnings can quote header values
        for index, res in supervised_map(functools.partial(worker, ctx), tasks, n_workers, initializer=quiet_pydicom,
                                         timeout_s=timeout_s, chunk=chunk):
            if isinstance(res, Failure):
                res = Rejected(Entry(ctx.ids.file(tasks[index][2]), "file", res.reason, res.detail), None)
            results[index] = res
            bar.update()
    finally:
        bar.close()
    return results


def _assemble(results: list[Record], labels: _Labels | None, cfg: DataConfig) -> tuple[list[tuple[Decoded, str]], list[Entry], list[str]]:
    """Join labels, drop duplicates, and decide the class list; every drop is quarantined.

    Returns:
        ``([(record, label)], quarantine entries, class names)``.
    """
    quarantine: list[Entry] = []
    wanted = tuple(cfg.classes)
    ok: list[tuple[Decoded, str]] = []
    seen_studies: set[str] = set()
    for res in results:
        if res.study_hint:
            seen_studies.add(res.study_hint)
        if isinstance(res, Rejected):
            quarantine.append(res.entry)
            continue
        if labels is not None:
            study = res.record
            if study in labels.conflicting:
                quarantine.append(Entry(study, "study", "conflicting_labels", "labels file gives this study different labels"))
                continue
            label = labels.by_study.get(study)
            if label is None:
                quarantine.append(Entry(study, "study", "no_label", "no row in the labels file"))
                continue
        else:
            label = res.folder_label
            if not label:
                quarantine.append(Entry(res.record, res.kind, "no_label", "image is not inside a class sub-folder"))
                continue
        if not _CLASS_NAME.match(label):  # free text (a name, a date, a note) never becomes a class
            quarantine.append(Entry(res.record, res.kind, "unknown_label", "label is not a plausible class name"))
            continue
        if wanted and label not in wanted:
            quarantine.append(Entry(res.record, res.kind, "unknown_label", f"label not in data.classes {list(wanted)}"))
            continue
        ok.append((res, label))

    if labels is not None:
        quarantine.extend(labels.quarantine)
        for study in sorted(set(labels.by_study) - seen_studies):
            quarantine.append(Entry(study, "label_row", "label_without_study", "labels row names a study that is not in the export"))

    # Output order follows the pseudonyms, so it reveals nothing about accession order.
    ok.sort(key=lambda pair: pair[0].record)
    groups: dict[str, list[tuple[Decoded, str]]] = defaultdict(list)
    for pair in ok:
        groups[pair[0].digest].append(pair)
    kept = []
    for pair in ok:
        r = pair[0]
        group = groups[r.digest]
        if len(group) == 1:
            kept.append(pair)
        elif len({label for _, label in group}) > 1:
            quarantine.append(Entry(r.record, r.kind, "duplicate_conflicting_labels", f"{len(group)} identical images with different labels"))
        elif pair is group[0]:
            kept.append(pair)
        else:
            quarantine.append(Entry(r.record, r.kind, "duplicate_image", f"same decoded pixels as record {group[0][0].record}"))

    class_names = list(wanted) if wanted else sorted({label for _, label in kept})
    quarantine.sort(key=lambda q: (q.reason, q.record))
    return kept, quarantine, class_names


def _write_outputs(out_dir, params, kept, quarantine, class_names, cfg, summary, images=None) -> None:
    from radsynth.io import atomic_dir

    counts = Counter(q.reason for q in quarantine)
    report = {
        "counts": {k: counts.get(k, 0) for k in REASONS},
        "total": len(quarantine),
        "reasons": REASONS,
        "entries": [q.as_dict() for q in quarantine],
    }
    with atomic_dir(out_dir) as tmp:
        if images is None:
            images = np.zeros((0, cfg.img_channels, cfg.img_resolution, cfg.img_resolution), dtype=np.uint8)
        np.save(tmp / "images.npy", images)
        with open(tmp / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for i, (r, label) in enumerate(kept):
                writer.writerow((i, r.record, r.patient, label))
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
