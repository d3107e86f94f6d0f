"""Validate: the Great Expectations suite passes on the sample and names what breaks."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections import Counter

import pandas as pd
import pytest

from components.validate import build_suites, run_suites, validate
from radsynth.dataset import load_dataset
from tests.components.ingest_sample import run_cli, sample_run


@pytest.fixture(scope="module")
def run(sample_export):
    result = sample_run()
    assert result.codes["validate"] == 0, result.logs["validate"]
    return result


def test_sample_dataset_passes_and_report_is_written(run):
    report = json.loads((run.artifacts / "validate" / "report.json").read_text())
    assert report["success"] is True and report["failed"] == []
    assert report["evaluated"] == len(report["results"]) >= 25
    kinds = {(r["table"], r["expectation"]) for r in report["results"]}
    assert ("patients", "expect_column_values_to_be_between") in kinds          # split disjointness
    assert ("classes", "expect_column_values_to_be_between") in kinds           # class balance
    assert ("columns", "expect_column_values_to_not_match_regex_list") in kinds  # PHI-looking columns
    assert "PASSED" in (run.artifacts / "validate" / "summary.md").read_text()
    assert (run.artifacts / "validate" / "params.yaml").is_file()


def _copy_with_leaked_patient(run, tmp_path):
    """A dataset copy where one patient's second image is moved to another split."""
    root = tmp_path / "dataset"
    shutil.copytree(run.artifacts / "dataset", root)
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    many = next(p for p, n in Counter(r["patient"] for r in rows).items() if n >= 2)
    row = [r for r in rows if r["patient"] == many][1]
    row["split"] = "test" if row["split"] != "test" else "train"
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_patient_in_two_splits_fails_with_a_named_expectation(run, tmp_path):
    root = _copy_with_leaked_patient(run, tmp_path)
    result = validate(run.params, dataset_dir=root, out_dir=tmp_path / "report")
    assert not result.success
    # both patient expectations catch it; the uniqueness one used to run on a groupby index and could not fail
    assert result.failed == ("patients: expect_column_values_to_be_unique(patient)",
                             "patients: expect_column_values_to_be_between(num_splits)")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "FAILED" in summary and "no patient in two splits" in summary


def test_cli_exits_non_zero_and_names_failures(run, tmp_path):
    sets = [s for s in run.overrides] + ["data.min_class_fraction=0.4", "data.pixel_mean_min=0.9"]
    code, out = run_cli("validate", sets, "--out", str(tmp_path / "report"))
    assert code == 1
    assert "classes: expect_column_values_to_be_between(fraction)" in out
    assert "images: expect_column_values_to_be_between(pixel_mean)" in out
    assert "Traceback" not in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["success"] is False and len(report["failed"]) == 2


def test_phi_looking_column_and_raw_ids_fail(run):
    ds = load_dataset(run.artifacts / "dataset")
    suites = build_suites(run.params, ds)
    tables = {
        "columns": pd.DataFrame({"table": "manifest.csv", "column": ["index", "patient", "PatientBirthDate"]}),
        "images": pd.DataFrame({
            "patient": ["GZ0000124"], "label": ["NORMAL"], "label_index": [0], "split": ["train"], "channels": [1],
            "height": [32], "width": [32], "dtype": ["uint8"], "pixel_mean": [0.5], "pixel_std": [0.2],
            "pixel_min": [0.0], "pixel_max": [1.0],
        }),
    }
    results = run_suites(tables, {k: suites[k] for k in tables})
    failed = {(r["table"], r["expectation"], r["column"]) for r in results if not r["success"]}
    assert failed == {
        ("columns", "expect_column_values_to_be_in_set", "column"),
        ("columns", "expect_column_values_to_not_match_regex_list", "column"),
        ("images", "expect_column_values_to_match_regex", "patient"),
    }


def test_label_set_comes_from_params_when_given(run, tmp_path):
    params = dataclasses.replace(run.params, data=dataclasses.replace(run.params.data, classes=("NORMAL", "PNEUMONIA_BACTERIAL", "COVID")))
    result = validate(params, dataset_dir=run.artifacts / "dataset", out_dir=tmp_path / "r")
    assert "images: expect_column_values_to_be_in_set(label)" in result.failed
    assert "classes: expect_column_distinct_values_to_equal_set(label)" in result.failed


def test_patient_uniqueness_expectation_can_fail_on_its_own(run):
    """The (patient, split) table with one patient twice fails uniqueness; one row per patient passes."""
    ds = load_dataset(run.artifacts / "dataset")
    def suite():  # uniqueness only; fresh objects per run (GX binds an expectation to one suite)
        return {"patients": build_suites(run.params, ds)["patients"][:1]}

    twice = pd.DataFrame({"patient": ["a" * 20, "a" * 20, "b" * 20], "split": ["train", "test", "val"], "num_splits": [1, 1, 1]})
    [bad] = run_suites({"patients": twice}, suite())
    assert bad["expectation"] == "expect_column_values_to_be_unique" and not bad["success"]
    [good] = run_suites({"patients": twice.iloc[1:]}, suite())
    assert good["success"]


def test_quality_quarantine_share_gates_the_dataset(run):
    ds = load_dataset(run.artifacts / "dataset")
    def suite():
        return {"quarantine": build_suites(run.params, ds)["quarantine"]}

    one = pd.DataFrame({"quality_quarantined": [1], "quality_fraction": [1 / 6000]})
    many = pd.DataFrame({"quality_quarantined": [900], "quality_fraction": [900 / 6000]})
    assert run_suites({"quarantine": one}, suite())[0]["success"]
    assert not run_suites({"quarantine": many}, suite())[0]["success"]
