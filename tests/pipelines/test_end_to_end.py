"""The whole job on the tiny profile, both ways: the Kubeflow pipeline run locally
(SubprocessRunner) and `dvc repro`; each ends with a registered model version. Then a
training parameter change invalidates training and what follows, nothing before it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines.conftest import step_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("radsynth", "model", "components", "pipelines", "serving")
# These tests check the wiring (tasks, artefacts, gate branch, registry), not model quality:
# a shorter schedule, and a gate any finite model passes (the gate's own tests live with it;
# with the real thresholds a tiny model on this slice fails, which takes the dsl.If branch
# that skips export and register).
FAST = {"train.kimg_fade": 0.2, "train.kimg_stabilize": 0.2}
PERMISSIVE_GATE = {f"eval.gate.{level}.{k}": v for level in ("release", "demo")
                   for k, v in {"min_cond_acc": 0.0, "cond_acc_ratio": 0.0, "max_fid_units": 1.0e9, "max_diversity": 1.0,
                                "min_recall": 0.0, "max_memorisation": 1.0}.items()}


def registered_versions(tracking_uri: str, name: str = "radsynth-generator") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return client.search_model_versions(f"name='{name}'")


def alias_version(tracking_uri: str, alias: str, name: str = "radsynth-generator") -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return str(client.get_model_version_by_alias(name, alias).version)


@pytest.mark.slow
def test_kfp_local_run_registers_and_promotes(tmp_path, small_export, eval_cache):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    sets = [f"paths.mlflow_uri={uri}", f"paths.mlflow_artifacts={tmp_path}/mlruns/artifacts",
            f"eval.cache_dir={eval_cache}", *(f"{k}={v}" for k, v in {**FAST, **PERMISSIVE_GATE}.items())]
    argv = [sys.executable, "-m", "radsynth.cli", "pipeline", "run-local", "--profile", "tiny",
            "--raw-dir", str(small_export), "--pipeline-root", str(tmp_path / "kfp")]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, cwd=ROOT, env=step_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "gate passed; registered model version 1 (alias champion)" in out.stdout
    # every task ran, one per training stage
    (run_dir,) = list((tmp_path / "kfp").iterdir())
    tasks = {p.name for p in run_dir.iterdir()}
    assert {"ingest", "preprocess", "validate", "train", "train-2", "evaluate", "export", "encoder", "register", "synthesize"} <= tasks
    # stage 2 resumed from stage 1's checkpoint: it carries both stages' folders
    stage2 = json.loads((run_dir / "train-2" / "executor_output.json").read_text())
    ckpt = Path(stage2["artifacts"]["checkpoint"]["artifacts"][0]["uri"])
    assert (ckpt / "stage_8").is_dir() and (ckpt / "stage_16").is_dir() and (ckpt / "G_ema.safetensors").is_file()
    versions = registered_versions(uri)
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["gate"] == "passed"
    assert alias_version(uri, "champion") == "1"
    assert alias_version(uri, "champion", "radsynth-encoder") == "1"   # promoted with its generator
    # the register task's model card and the synthesize task's dataset, from exactly that version
    register_out = json.loads((run_dir / "register" / "executor_output.json").read_text())
    card = Path(register_out["artifacts"]["model_card"]["artifacts"][0]["uri"]).read_text()
    assert card.startswith("# Model card: radsynth-generator v1") and versions[0].description == card
    synth = json.loads((run_dir / "synthesize" / "executor_output.json").read_text())
    sheet = json.loads((Path(synth["artifacts"]["synthetic"]["artifacts"][0]["uri"]) / "datasheet.json").read_text())
    assert (sheet["version"], sheet["images"], sheet["origin"]) == (1, 12, "models:/radsynth-generator/1")   # tiny: 4 x 3


def make_dvc_project(tmp: Path, export: Path, cache: Path) -> Path:
    proj = tmp / "proj"
    proj.mkdir()
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "mlflow", proj / "mlflow")
    shutil.copy(ROOT / "dvc.yaml", proj)
    shutil.copytree(export, proj / "data", symlinks=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["paths"]["mlflow_uri"] = f"sqlite:///{proj}/mlruns/mlflow.db"
    params["eval"]["cache_dir"] = str(cache)
    for dotted, value in {**FAST, **PERMISSIVE_GATE}.items():   # in the profile's overlay, which wins
        *sections, key = dotted.split(".")
        node = params["profiles"]["tiny"]
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=proj, check=True)
    shutil.copy(ROOT / ".dvcignore", proj / ".dvcignore")
    return proj


@pytest.mark.slow
def test_dvc_repro_registers_then_training_change_reruns_from_train(tmp_path, small_export, eval_cache):
    proj = make_dvc_project(tmp_path, small_export, eval_cache)
    env = {**step_env(tmp_path), "PYTHONPATH": str(proj)}
    dvc = str(Path(sys.executable).parent / "dvc")
    run = lambda *a: subprocess.run([dvc, *a], cwd=proj, env=env, capture_output=True, text=True, timeout=600)

    out = run("repro")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    record = json.loads((proj / "artifacts" / "register" / "register.json").read_text())
    uri = f"sqlite:///{proj}/mlruns/mlflow.db"
    assert record["version"] == 1 and record["gate"] == "passed"
    assert [str(v.version) for v in registered_versions(uri)] == ["1"]
    assert json.loads((proj / "artifacts" / "evaluate" / "metrics.json").read_text())["gate_passed"] == 1.0
    mv = registered_versions(uri)[0]
    trained = json.loads((proj / "artifacts" / "train" / "train.json").read_text())
    assert mv.tags["train_run_id"] == (trained["mlflow_run_id"] or "unknown")   # tiny: tracking off, so no training run
    assert mv.description.startswith("# Model card: radsynth-generator v1")
    sheet = json.loads((proj / "artifacts" / "synthesize" / "datasheet.json").read_text())
    assert (sheet["version"], sheet["images"], sheet["origin"]) == (1, 12, "models:/radsynth-generator@candidate")

    out = run("status", "--json")
    assert out.returncode == 0 and json.loads(out.stdout or "{}") == {}, out.stdout   # all up to date

    # a training parameter changes (a base value the tiny overlay does not set)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr_g"] = 2e-4
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run("status", "--json")
    assert set(json.loads(out.stdout)) == {"train"}, out.stdout
    out = run("repro", "--dry")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert ran[:1] == ["train"] and not {"ingest", "preprocess", "validate"} & set(ran), out.stdout
