"""Step ``validate``: a Great Expectations suite over the prepared dataset.

The dataset is described by five small pandas tables, each validated by its own suite
(GX 1.x, ephemeral context, pandas data source; nothing is written to a GX project):

* ``images``   one row per image: manifest columns, full-resolution shape/dtype, pixel stats
* ``levels``   one row per progressive level: shape, dtype, row count
* ``classes``  one row per (split, class): count and fraction of the split
* ``patients`` one row per (patient, split) pair seen in the manifest: a patient in two splits
  is two rows, so "one row per patient" can fail (a groupby index never could)
* ``columns``  one row per column name of every table the dataset ships (``manifest.csv``)
* ``quarantine`` one row: the share of ingested images quarantined for quality (near-black,
  near-white, blank)

Checks: shapes, dtype, label set, class-balance bounds (``data.min/max_class_fraction``, per
split), split disjointness by patient, pixel statistics (``data.pixel_*``: ingest already
quarantined each outlier with its reason, so these hold unless the dataset was built some other
way), the quality-quarantine share (``data.max_quality_fraction``: the dataset-level gate),
pseudonym format, and no PHI-looking column. Writes ``<artifacts>/validate/report.json`` and ``summary.md``;
a failed expectation makes ``radsynth validate`` exit 1 and names it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from radsynth.config import Params
from radsynth.dataset import MANIFEST_COLUMNS, SPLITS, levels_for, load_dataset
from radsynth.errors import RadsynthError

STEP = "validate"

# Column names that suggest identifying data (matched case-insensitively).
PHI_COLUMN_PATTERNS = [
    r"(?i)name", r"(?i)birth", r"(?i)\bdob\b", r"(?i)accession", r"(?i)uid", r"(?i)mrn",
    r"(?i)patient_?id", r"(?i)institution", r"(?i)physician", r"(?i)address", r"(?i)phone",
    r"(?i)date", r"(?i)path", r"(?i)file",
]
PSEUDONYM_REGEX = r"^[0-9a-f]{20}$"


class ValidationFailed(RadsynthError):
    """The dataset broke at least one expectation (see the report)."""


@dataclasses.dataclass(frozen=True)
class ValidateResult:
    out_dir: Path
    success: bool
    evaluated: int                             # expectations run
    failed: tuple[str, ...]                    # "table: expectation(column)" of each failure


def dataset_tables(dataset_dir: str | os.PathLike) -> dict:
    """The pandas tables the suites run on (see the module docstring)."""
    import pandas as pd

    ds = load_dataset(dataset_dir)
    full = np.load(Path(dataset_dir) / f"images_{ds.img_resolution}.npy", mmap_mode="r")  # [N, C, R, R]
    stats = np.zeros((len(ds), 4), dtype=np.float64)  # [N, (mean, std, min, max)] in [0, 1]
    for start in range(0, len(ds), 1024):  # bounded memory: 1024 images at a time
        flat = np.asarray(full[start : start + 1024], dtype=np.float32).reshape(-1, int(np.prod(full.shape[1:]))) / 255.0
        stats[start : start + 1024] = np.stack([flat.mean(1), flat.std(1), flat.min(1), flat.max(1)], axis=1)
    with open(Path(dataset_dir) / "manifest.csv", newline="") as fh:
        manifest_columns = next(csv.reader(fh))
    images = pd.DataFrame(
        {
            "patient": ds.patients,
            "label": np.array(ds.classes, dtype=object)[ds.labels] if len(ds) else [],
            "label_index": ds.labels,
            "split": ds.splits,
            "channels": full.shape[1],
            "height": full.shape[2],
            "width": full.shape[3],
            "dtype": str(full.dtype),
            "pixel_mean": stats[:, 0],
            "pixel_std": stats[:, 1],
            "pixel_min": stats[:, 2],
            "pixel_max": stats[:, 3],
        }
    )
    level_rows = []
    for res in ds.levels:
        arr = np.load(Path(dataset_dir) / f"images_{res}.npy", mmap_mode="r")
        level_rows.append({"res": res, "rows": arr.shape[0], "ndim": arr.ndim, "channels": arr.shape[1],
                           "height": arr.shape[2], "width": arr.shape[3], "dtype": str(arr.dtype)})
    class_rows = []
    for split in SPLITS:
        in_split = ds.splits == split
        total = int(in_split.sum())
        for i, name in enumerate(ds.classes):
            count = int((in_split & (ds.labels == i)).sum())
            class_rows.append({"split": split, "label": name, "count": count, "fraction": count / total if total else 0.0})
    pairs = pd.DataFrame({"patient": ds.patients, "split": ds.splits}).drop_duplicates(ignore_index=True)
    splits_per_patient = pairs.groupby("patient")["split"].transform("nunique")
    patients = pd.DataFrame({"patient": pairs["patient"], "split": pairs["split"], "num_splits": splits_per_patient})
    columns = pd.DataFrame({"table": "manifest.csv", "column": manifest_columns})
    ingested = ds.meta.get("ingest") or {}
    kept, dropped = int(ingested.get("num_images", len(ds))), int(ingested.get("quality_quarantined", 0))
    quarantine = pd.DataFrame({"quality_quarantined": [dropped], "quality_fraction": [dropped / max(kept + dropped, 1)]})
    return {
        "dataset": ds,
        "images": images,
        "levels": pd.DataFrame(level_rows),
        "classes": pd.DataFrame(class_rows),
        "patients": patients,
        "columns": columns,
        "quarantine": quarantine,
    }


def build_suites(params: Params, ds) -> dict[str, list]:
    """Expectations per table, each with ``meta.why`` saying what it protects."""
    import great_expectations as gx

    E = gx.expectations
    cfg = params.data
    classes = list(cfg.classes) or ds.classes
    res, ch = cfg.img_resolution, cfg.img_channels

    def why(text: str) -> dict:
        return {"why": text}

    return {
        "images": [
            E.ExpectTableRowCountToBeBetween(min_value=1, meta=why("the dataset is not empty")),
            *[E.ExpectColumnValuesToNotBeNull(column=c, meta=why("no missing values")) for c in ("patient", "label", "split")],
            E.ExpectColumnValuesToBeInSet(column="label", value_set=classes, meta=why("label set is the configured class list")),
            E.ExpectColumnValuesToBeBetween(column="label_index", min_value=0, max_value=len(classes) - 1, meta=why("label index inside the class list")),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta=why("split names")),
            E.ExpectColumnValuesToMatchRegex(column="patient", regex=PSEUDONYM_REGEX, meta=why("patients are salted pseudonyms, never raw IDs")),
            E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"], meta=why("images stored as uint8")),
            E.ExpectColumnValuesToBeInSet(column="channels", value_set=[ch], meta=why("data.img_channels")),
            E.ExpectColumnValuesToBeInSet(column="height", value_set=[res], meta=why("data.img_resolution")),
            E.ExpectColumnValuesToBeInSet(column="width", value_set=[res], meta=why("data.img_resolution")),
            E.ExpectColumnValuesToBeBetween(column="pixel_mean", min_value=cfg.pixel_mean_min, max_value=cfg.pixel_mean_max,
                                            meta=why("no near-black or near-white images (data.pixel_mean_min/max)")),
            E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=cfg.pixel_std_min, meta=why("no blank images (data.pixel_std_min)")),
            E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0.0, max_value=1.0, meta=why("pixels in range")),
            E.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0.0, max_value=1.0, meta=why("pixels in range")),
        ],
        "levels": [
            E.ExpectColumnDistinctValuesToEqualSet(column="res", value_set=levels_for(res, cfg.min_resolution),
                                                   meta=why("every progressive level from data.min_resolution to data.img_resolution")),
            E.ExpectColumnPairValuesToBeEqual(column_A="height", column_B="res", meta=why("level arrays are res x res")),
            E.ExpectColumnPairValuesToBeEqual(column_A="width", column_B="res", meta=why("level arrays are res x res")),
            E.ExpectColumnValuesToBeInSet(column="rows", value_set=[len(ds)], meta=why("every level holds every image")),
            E.ExpectColumnValuesToBeInSet(column="ndim", value_set=[4], meta=why("[N, C, H, W]")),
            E.ExpectColumnValuesToBeInSet(column="channels", value_set=[ch], meta=why("data.img_channels")),
            E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"], meta=why("uint8 storage")),
        ],
        "classes": [
            E.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=classes, meta=why("every class is present")),
            E.ExpectColumnValuesToBeBetween(column="fraction", min_value=cfg.min_class_fraction, max_value=cfg.max_class_fraction,
                                            meta=why("class balance in every split (data.min/max_class_fraction)")),
        ],
        "patients": [
            E.ExpectColumnValuesToBeUnique(column="patient", meta=why("one (patient, split) pair per patient: each patient in one split")),
            E.ExpectColumnValuesToBeBetween(column="num_splits", min_value=1, max_value=1, meta=why("no patient in two splits")),
        ],
        "quarantine": [
            E.ExpectColumnValuesToBeBetween(column="quality_fraction", min_value=0.0, max_value=cfg.max_quality_fraction,
                                            meta=why("few images dropped for quality (data.max_quality_fraction): "
                                                     "one outlier is quarantined, a broken export is refused")),
        ],
        "columns": [
            E.ExpectColumnValuesToBeInSet(column="column", value_set=list(MANIFEST_COLUMNS), meta=why("manifest has exactly the contract's columns")),
            E.ExpectColumnValuesToNotMatchRegexList(column="column", regex_list=PHI_COLUMN_PATTERNS, meta=why("no PHI-looking column")),
        ],
    }


def run_suites(tables: dict, suites: dict[str, list]) -> list[dict]:
    """Run every suite with an ephemeral GX context; one compact dict per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("radsynth")
    out = []
    for table, expectations in suites.items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"radsynth-{table}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"radsynth-{table}", data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": tables[table]}).to_json_dict()
        for item in result["results"]:
            cfg = item["expectation_config"]
            kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            detail = item.get("result") or {}
            out.append({
                "table": table,
                "expectation": cfg["type"],
                "column": kwargs.get("column") or ",".join(str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs) or None,
                "kwargs": kwargs,
                "why": (cfg.get("meta") or {}).get("why", ""),
                "success": bool(item["success"]),
                "observed": detail.get("observed_value"),
                "unexpected_count": detail.get("unexpected_count"),
                "partial_unexpected": (detail.get("partial_unexpected_list") or [])[:5],
                "exception": (item.get("exception_info") or {}).get("exception_message"),
            })
    return out


def _name(r: dict) -> str:
    return f"{r['table']}: {r['expectation']}" + (f"({r['column']})" if r["column"] else "")


def summary_markdown(results: list[dict], success: bool) -> str:
    """A readable report: failures first, each with what it protects and what was seen."""
    failed = [r for r in results if not r["success"]]
    lines = [f"# Dataset validation: {'PASSED' if success else 'FAILED'}", "",
             f"{len(results) - len(failed)} of {len(results)} expectations met.", ""]
    if failed:
        lines += ["## Failed", ""]
        for r in failed:
            seen = r["observed"] if r["observed"] is not None else f"{r['unexpected_count']} unexpected, e.g. {r['partial_unexpected']}"
            lines.append(f"- **{_name(r)}**: {r['why']}; expected {r['kwargs']}; seen {seen}" + (f"; error: {r['exception']}" if r["exception"] else ""))
        lines.append("")
    lines += ["## All", ""] + [f"- [{'x' if r['success'] else ' '}] {_name(r)}: {r['why']}" for r in results]
    return "\n".join(lines) + "\n"


def validate(params: Params, dataset_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> ValidateResult:
    """Validate ``<artifacts>/dataset`` and write ``<artifacts>/validate``.

    Returns:
        The :class:`ValidateResult`; ``success`` is False when any expectation failed (the
        report still gets written, naming them).
    """
    from radsynth.io import atomic_dir

    dataset_dir = Path(dataset_dir or Path(params.paths.artifacts) / "dataset")
    out_dir = Path(out_dir or Path(params.paths.artifacts) / STEP)
    tables = dataset_tables(dataset_dir)
    results = run_suites(tables, build_suites(params, tables["dataset"]))
    success = all(r["success"] for r in results)
    failed = tuple(_name(r) for r in results if not r["success"])
    report = {"step": STEP, "success": success, "evaluated": len(results), "failed": list(failed), "results": results}
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(results, success))
        params.save(tmp / "params.yaml")
    return ValidateResult(out_dir=out_dir, success=success, evaluated=len(results), failed=failed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help="dataset folder (default: <paths.artifacts>/dataset)")
    parser.add_argument("--out", default=None, help="report folder (default: <paths.artifacts>/validate)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    res = validate(load_cli_params(args), dataset_dir=args.dataset, out_dir=args.out)
    if res.success:
        print(f"validate: all {res.evaluated} expectations met -> {res.out_dir / 'report.json'}")
        return 0
    print(f"validate: FAILED {len(res.failed)} of {res.evaluated} expectations (report: {res.out_dir / 'summary.md'}):")
    for name in res.failed:
        print(f"  - {name}")
    return 1
