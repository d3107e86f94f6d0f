"""The bridge between KFP artefacts and the steps' artefact folders."""

import json
from pathlib import Path

import pytest
from kfp.dsl import Metrics

from pipelines.workspace import log_metrics, overrides_from, rebase_raw, step_workspace
from radsynth.errors import RadsynthError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)   # steps read ./params.yaml, as in the image's /app


def test_inputs_linked_or_copied_outputs_published(tmp_path):
    dataset, prev = tmp_path / "dataset", tmp_path / "prev_train"
    dataset.mkdir(); (dataset / "dataset.json").write_text("{}")
    prev.mkdir(); (prev / "stage_8").mkdir(); (prev / "stage_8" / "ckpt").write_text("8")
    out = tmp_path / "out" / "checkpoint"
    metrics = Metrics(name="metrics", uri=str(tmp_path / "m"), metadata={})
    with step_workspace("tiny", ["train.seed=3"], inputs={"dataset": str(dataset), "train": str(prev), "unused": None},
                        outputs={"train": str(out)}, metrics=metrics) as ws:
        root = ws.root
        assert (root / "dataset").is_symlink()                       # read-only input: linked
        assert not (root / "train").is_symlink()                     # also an output: copied
        (root / "train" / "stage_16").mkdir()
        (root / "train" / "stage_16" / "ckpt").write_text("16")
        (root / "train" / "metrics.json").write_text(json.dumps({"kimg": 2, "loss": 0.5, "nan": float("nan"), "name": "x"}))
        assert ws.cli_args == ["--profile", "tiny", "--set", "train.seed=3", "--set", f"paths.artifacts={root}"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "stage_16", "stage_8"]
    assert not (prev / "stage_16").exists()                          # upstream artefact untouched
    assert metrics.metadata == {"kimg": 2.0, "loss": 0.5}            # finite numbers only
    assert not root.exists()                                         # temporary root removed


def test_missing_output_folder_and_missing_input_are_errors(tmp_path):
    with pytest.raises(RadsynthError, match="produced no export/ folder"):
        with step_workspace("tiny", [], outputs={"export": str(tmp_path / "o")}):
            pass
    with pytest.raises(RadsynthError, match="input artefact 'dataset' not found"):
        with step_workspace("tiny", [], inputs={"dataset": str(tmp_path / "nope")}):
            pass


def test_failed_step_publishes_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ZeroDivisionError):
        with step_workspace("tiny", [], outputs={"export": str(out)}) as ws:
            (ws.root / "export").mkdir()
            1 / 0
    assert not out.exists()


def test_workspace_runs_the_cli_with_its_flags(tmp_path, capsys):
    with step_workspace("tiny", ["seed=7"]) as ws:
        assert ws.run("pipeline", "compile", "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "profile: tiny" in printed and "seed: 7" in printed and "artifacts: " in printed


def test_overrides_validated():
    assert overrides_from(["a.b=1"]) == ["a.b=1"]
    with pytest.raises(RadsynthError, match="expected key=value"):
        overrides_from(["oops"])


def test_rebase_raw_moves_paths_under_the_export_root():
    got = rebase_raw("data", "/mnt/data", {"data.dicom_dir": "data/dicom", "data.labels_csv": "data/labels.csv",
                                           "data.image_dir": "", "data.other": "/elsewhere/x"})
    assert got == ["paths.raw=/mnt/data", "data.dicom_dir=/mnt/data/dicom", "data.labels_csv=/mnt/data/labels.csv"]
    assert rebase_raw("data", "data", {"data.dicom_dir": "data/dicom"}) == []


def test_log_metrics_counts():
    m = Metrics(name="m", uri="/tmp/m", metadata={})
    assert log_metrics(m, {"a": 1, "b": True, "c": float("inf"), "d": [1]}) == 2
    assert m.metadata == {"a": 1.0, "b": 1.0}
