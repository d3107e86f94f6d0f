"""The Kubeflow pipeline compiles per profile, wires stages and the gate as designed, and the
committed IR is what the code compiles to."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import CLUSTER_PROFILE, DEFAULT_IR, compile_pipeline, submit
from pipelines.component import image_ref
from pipelines.radsynth_pipeline import STEPS, build_pipeline, stage_resolutions
from radsynth.config import load_params
from radsynth.errors import RadsynthError

ROOT = Path(__file__).resolve().parents[2]


def compiled(tmp_path: Path, profile: str) -> tuple[dict, dict]:
    path = compile_pipeline(load_params(ROOT / "params.yaml", profile=profile), tmp_path / f"{profile}.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def all_tasks(ir: dict) -> dict[str, dict]:
    """task name -> task spec, from the root DAG and every sub-DAG (conditions)."""
    tasks = dict(ir["root"]["dag"]["tasks"])
    for comp in ir["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_compiles_with_one_task_per_stage(tmp_path, profile):
    params = load_params(ROOT / "params.yaml", profile=profile)
    stages = stage_resolutions(params)
    assert stages and stages == sorted(stages) and all(r & (r - 1) == 0 for r in stages)
    ir, _ = compiled(tmp_path, profile)
    tasks = all_tasks(ir)
    train = sorted((t for t in tasks if t.split("-")[0] == "train"), key=lambda t: int(t.split("-")[1]) if "-" in t else 1)
    assert len(train) == len(stages)
    assert [tasks[t]["taskInfo"]["name"] for t in train] == [f"train-{r}" for r in stages]
    # every stage after the first takes the previous stage's checkpoint as an input artefact
    for prev, cur in zip(train, train[1:]):
        src = tasks[cur]["inputs"]["artifacts"]["previous"]["taskOutputArtifact"]
        assert src == {"outputArtifactKey": "checkpoint", "producerTask": prev}
    assert "previous" not in tasks[train[0]]["inputs"].get("artifacts", {})
    # the stage resolution is a constant per task
    got = [tasks[t]["inputs"]["parameters"]["resolution"]["runtimeValue"]["constant"] for t in train]
    assert [int(g) for g in got] == stages
    # evaluate reads the LAST stage's checkpoint
    ev = tasks["evaluate"]["inputs"]["artifacts"]["checkpoint"]["taskOutputArtifact"]
    assert ev["producerTask"] == train[-1]
    assert ir["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == profile


def test_export_and_register_only_under_the_gate(tmp_path):
    ir, _ = compiled(tmp_path, "tiny")
    root = ir["root"]["dag"]["tasks"]
    assert "export" not in root and "register" not in root
    (cond_name,) = [n for n, t in root.items() if t["taskInfo"]["name"] == "gate-passed"]
    cond = root[cond_name]
    assert "evaluate" in cond["dependentTasks"]
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    inner = ir["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"export", "encoder", "register", "synthesize"}
    assert inner["encoder"]["inputs"]["artifacts"]["onnx"]["taskOutputArtifact"]["producerTask"] == "export"
    assert "encoder" in inner["register"]["dependentTasks"]   # promote finds the encoder for this generator
    assert inner["register"]["inputs"]["artifacts"]["onnx"]["taskOutputArtifact"]["producerTask"] == "export"
    assert inner["synthesize"]["inputs"]["parameters"]["version"]["taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "register"}


def test_task_names_are_the_step_names(tmp_path):
    ir, _ = compiled(tmp_path, "cpu")
    names = {t if not t.startswith("train") else "train" for t in all_tasks(ir) if not t.startswith("condition")}
    assert names == set(STEPS)
    comps = {re.sub(r"-\d+$", "", c.removeprefix("comp-")) for c in ir["components"] if not c.startswith("comp-condition")}
    assert comps == set(STEPS)


def test_components_run_the_project_image_without_installs(tmp_path):
    ir, _ = compiled(tmp_path, "gpu")
    image = image_ref(load_params(ROOT / "params.yaml", profile="gpu").pipeline)
    executors = ir["deploymentSpec"]["executors"]
    assert executors
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == image, name
        text = " ".join(c.get("command", []) + c.get("args", []))
        assert "pip install" not in text and "kfp.dsl.executor_main" in text, name


def test_gpu_profile_sets_accelerators_volumes_and_placement(tmp_path):
    cfg = load_params(ROOT / "params.yaml", profile="gpu").pipeline
    ir, platform = compiled(tmp_path, "gpu")
    executors = ir["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train_execs = [n for n in executors if n.startswith("exec-train")]
    assert train_execs
    for name in train_execs:
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == cfg.gpu_resource
        assert int(res["accelerator"]["resourceCount"]) == cfg.train_gpus >= 1
        key, _, value = cfg.gpu_node_selector.partition("=")
        assert k8s[name]["nodeSelector"]["labels"] == {key: value}
        assert k8s[name]["tolerations"][0]["key"] == cfg.gpu_toleration
        assert k8s[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        env = {e["name"]: e["value"] for e in executors[name]["container"].get("env", [])}
        assert env["MLFLOW_TRACKING_URI"] == cfg.mlflow_uri
    # the raw export is mounted into ingest only, and the salt comes from a Secret
    pvc_users = [n for n, spec in k8s.items() if spec.get("pvcMount")]
    assert pvc_users == ["exec-ingest"]
    assert k8s["exec-ingest"]["pvcMount"][0]["constant"] == cfg.data_pvc
    assert k8s["exec-ingest"]["secretAsEnv"][0]["secretName"] == cfg.salt_secret
    assert ir["root"]["inputDefinitions"]["parameters"]["raw_dir"]["defaultValue"] == cfg.data_mount


def test_cpu_profile_requests_no_gpu(tmp_path):
    ir, _ = compiled(tmp_path, "cpu")
    for name, ex in ir["deploymentSpec"]["executors"].items():
        assert "accelerator" not in ex["container"].get("resources", {}), name


def test_committed_ir_is_current(tmp_path):
    """pipelines/radsynth_pipeline.yaml is what `radsynth pipeline compile` writes now."""
    fresh = compile_pipeline(load_params(ROOT / "params.yaml", profile=CLUSTER_PROFILE), tmp_path / "fresh.yaml")
    assert DEFAULT_IR.is_file(), "missing pipelines/radsynth_pipeline.yaml: run `radsynth pipeline compile`"
    assert DEFAULT_IR.read_text() == fresh.read_text(), (
        "pipelines/radsynth_pipeline.yaml is stale: run `radsynth pipeline compile` and commit it")


def test_submit_to_unreachable_host_is_a_clear_error():
    params = load_params(ROOT / "params.yaml", profile="tiny")
    with pytest.raises(RadsynthError, match=r"could not submit to Kubeflow Pipelines at http://127\.0\.0\.1:9 .*ConnectionError|could not submit to Kubeflow Pipelines at http://127\.0\.0\.1:9"):
        submit(params, "http://127.0.0.1:9")


def test_cli_submit_without_host_and_bad_host(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "radsynth.cli", "pipeline", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    out = run("submit", "--profile", "tiny")
    assert out.returncode == 2 and "no Kubeflow Pipelines host" in out.stderr and "Traceback" not in out.stderr
    out = run("submit", "--profile", "tiny", "--host", "http://127.0.0.1:9")
    assert out.returncode == 2 and "could not submit" in out.stderr and "Traceback" not in out.stderr
    out = run("compile", "--profile", "tiny", "--output", str(tmp_path / "p.yaml"))
    assert out.returncode == 0 and (tmp_path / "p.yaml").is_file()


def test_non_progressive_variant_trains_in_one_task(tmp_path):
    """The baseline (dcgan) has one full-resolution stage: one training task, no code change."""
    params = load_params(ROOT / "params.yaml", profile="cpu", overrides={"model.variant": "dcgan"})
    path = compile_pipeline(params, tmp_path / "dcgan.yaml")
    ir = next(yaml.safe_load_all(path.read_text()))
    train = [t for t in all_tasks(ir) if t.startswith("train")]
    final = params.train.final_resolution or params.data.img_resolution
    assert train == ["train"] and all_tasks(ir)["train"]["taskInfo"]["name"] == f"train-{final}"
