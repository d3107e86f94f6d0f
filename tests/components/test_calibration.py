"""The judge proves it can fail: the gate on calibration sets built from the real sample, through DVC.

The sample export (DVC-pulled, as CI does) goes through the project's own ``dvc repro`` up to
``validate``; ``radsynth evaluate --calibrate`` then trains the judge once (cached for the session)
and runs both gate levels, with the thresholds of ``params.yaml``, on noise, blurred,
checkerboarded, label-shuffled, collapsed, verbatim and shifted training images (must fail) and
the real val split (must pass). To stay within minutes on 2 cores this runs at 32x32 with a
shorter judge schedule (``CI_EVAL``); the ``cpu`` profile's own 64x64 calibration is recorded in
docs/benchmarks.md (``radsynth evaluate --calibrate --profile cpu``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radsynth import metric_keys as mk
from tests.pipelines.conftest import step_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("radsynth", "model", "components", "pipelines", "serving")
RESOLUTION = 32
CI_EVAL = {"judge": {"max_epochs": 12, "patience": 3}, "samples_per_class": 120, "tracking": True}
MUST_FAIL = ("noise", "blurred", "checkerboard", "shuffled_labels", "collapse", "verbatim", "near_copies")


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, sample_export):
    """A DVC project on the whole sample at 32x32, prepared by `dvc repro validate`, then calibrated."""
    proj = tmp_path_factory.mktemp("calibration") / "proj"
    proj.mkdir()
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj)
    shutil.copy(ROOT / ".dvcignore", proj)
    for f in sample_export.rglob("*"):  # the export, file by file as symlinks (DVC hashes their content)
        if f.is_file():
            dst = proj / "data" / f.relative_to(sample_export)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f.resolve())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "cpu"
    cpu = params["profiles"]["cpu"]
    cpu["data"] = {**(cpu.get("data") or {}), "img_resolution": RESOLUTION}
    cpu["train"] = {**(cpu.get("train") or {}), "final_resolution": RESOLUTION}
    cpu["eval"] = {**(cpu.get("eval") or {}), **CI_EVAL}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**step_env(proj), "PYTHONPATH": str(proj)}
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "dvc"), "init", "--no-scm", "-q"], cwd=proj, check=True)
    out = subprocess.run([str(bin_dir / "dvc"), "repro", "validate"], cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = lambda: subprocess.run([str(bin_dir / "radsynth"), "evaluate", "--profile", "cpu", "--calibrate"],  # noqa: E731
                                 cwd=proj, env=env, capture_output=True, text=True, timeout=1200)
    first = run()
    return proj, first, run


def test_every_bad_set_fails_and_real_val_passes(calibrated):
    proj, first, _ = calibrated
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "every verdict as expected" in first.stdout
    cal = json.loads((proj / "artifacts" / "evaluate" / "calibration.json").read_text())
    assert cal["ok"] and cal["ok_by_level"] == {"release": True, "demo": True}
    rows = {r["name"]: r for r in cal["rows"]}
    assert set(rows) == {*MUST_FAIL, "real_val"}
    for name in MUST_FAIL:
        release = rows[name]["levels"]["release"]
        assert release["verdict"] == "fail" and release["margin"] < 0 and release["failed"], name
    for name in ("noise", "shuffled_labels", "collapse", "verbatim", "near_copies"):
        assert rows[name]["levels"]["demo"]["verdict"] == "fail", name
    for level in ("release", "demo"):
        ok = rows["real_val"]["levels"][level]
        assert ok["verdict"] == "pass" and ok["margin"] > 0 and not ok["failed"], level
    # Each bad set fails for its own reason, not by accident.
    assert "memorisation_share" in rows["verbatim"]["levels"]["release"]["failed"]
    assert "memorisation_share" in rows["near_copies"]["levels"]["release"]["failed"]
    assert any(n.startswith(mk.MS_SSIM_DIVERSITY) for n in rows["collapse"]["levels"]["release"]["failed"])
    assert any(n.startswith(mk.COND_ACC) for n in rows["shuffled_labels"]["levels"]["release"]["failed"])
    assert any(n.startswith(mk.FID_DOMAIN_UNITS) for n in rows["noise"]["levels"]["release"]["failed"])


def test_distances_rank_noise_above_blur_above_real(calibrated):
    proj, *_ = calibrated
    cal = json.loads((proj / "artifacts" / "evaluate" / "calibration.json").read_text())
    assert cal["ranking"]["ok"], cal["ranking"]
    for c, r in cal["ranking"]["per_condition"].items():
        assert r["noise"] > r["blurred"] > r["real_val"], c
        assert 0.3 < r["real_val"] < 3.0, c    # real images are about one reference unit away


def test_collapse_has_precision_without_recall(calibrated):
    """On real data: one image repeated lies on the real manifold (precision) but covers none of it (recall)."""
    proj, *_ = calibrated
    cal = json.loads((proj / "artifacts" / "evaluate" / "calibration.json").read_text())
    rows = {r["name"]: r["values"] for r in cal["rows"]}
    for c in cal["classes"]:
        collapse, real = rows["collapse"], rows["real_val"]
        assert collapse[mk.per_class(mk.RECALL, c)] < 0.1 < real[mk.per_class(mk.RECALL, c)], c
        assert collapse[mk.per_class(mk.PRECISION, c)] > collapse[mk.per_class(mk.RECALL, c)], c


def test_the_table_is_logged_to_mlflow(calibrated):
    from mlflow import MlflowClient

    proj, *_ = calibrated
    uri = f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "radsynth"]
    runs = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'calibrate'")
    assert runs and runs[0].data.tags["calibration_ok"] == "true"
    assert runs[0].data.metrics["calibration_ok/release"] == 1.0
    assert runs[0].data.metrics["calibration_margin/noise/release"] < 0 < runs[0].data.metrics["calibration_margin/real_val/release"]
    assert {f.path for f in client.list_artifacts(runs[0].info.run_id, "evaluate")} >= {"evaluate/calibration.md", "evaluate/calibration.json"}


def test_the_report_and_the_cached_rerun(calibrated):
    proj, _, run = calibrated
    table = (proj / "artifacts" / "evaluate" / "calibration.md").read_text()
    assert table.startswith("# Gate calibration: every verdict as expected")
    for name in (*MUST_FAIL, "real_val"):
        assert f"| {name} |" in table
    cal = json.loads((proj / "artifacts" / "evaluate" / "calibration.json").read_text())
    assert 0 < cal["judge"]["test"]["balanced"] <= 1 and set(cal["judge"]["test"]["per_class"]) == set(cal["classes"])
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    cached = json.loads((proj / "artifacts" / "evaluate" / "calibration.json").read_text())
    assert cached["cached"] is True and cached["rows"] == cal["rows"]
