"""Fixtures for the pipeline tests: a small, class-balanced slice of the sample export."""

import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = 40          # studies per condition in the slice (tiny profile: seconds per step)


@pytest.fixture(scope="session")
def small_export(tmp_path_factory, sample_export) -> Path:
    """``dicom/<patient>/<accession>.dcm`` + ``labels.csv`` for PER_CLASS studies per label.

    Files are symlinks into the DVC-pulled sample, so building it costs nothing.
    """
    out = tmp_path_factory.mktemp("export")
    files = {p.stem: p for p in (sample_export / "dicom").rglob("*.dcm")}
    rows, taken = [], {}
    with open(sample_export / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            acc, label = row["accession_number"], row["label"]
            if acc in files and taken.get(label, 0) < PER_CLASS:
                taken[label] = taken.get(label, 0) + 1
                rows.append(row)
                dst = out / "dicom" / files[acc].parent.name / files[acc].name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(files[acc].resolve(), dst)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["accession_number", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert len(taken) >= 2 and min(taken.values()) == PER_CLASS, taken
    return out


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    """One evaluation cache (domain classifier, real features) for the end-to-end tests:
    they evaluate on the same slice and split, so the second reuses what the first computed."""
    return tmp_path_factory.mktemp("eval-cache")


def step_env(tmp: Path) -> dict[str, str]:
    """Environment for step subprocesses: this checkout first on the path, a fixed salt."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "RADSYNTH_SALT": "pipeline-tests-salt",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_TELEMETRY": "false",
    }
