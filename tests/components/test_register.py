"""MLflow registry on a temporary SQLite store: candidate, gated promotion, rollback, resolve by alias."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from components import evaluate as ev
from components import export as ex
from components import register as rg
from radsynth import registry as reg
from radsynth.cli import main
from tests.components.evaldata import CLASSES, eval_params, make_dataset, save_tiny_generator, synth_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("registry")
    params = eval_params(root)
    dataset = make_dataset(root / "artifacts" / "dataset")
    gen = save_tiny_generator(root / "G_ema.safetensors", seed=7)
    ex.export(params, gen, root / "export")
    labels = np.repeat(np.arange(len(CLASSES)), params.eval.samples_per_class)
    passed = ev.evaluate_images(synth_images(labels, 16, seed=11), labels, dataset.root, params, root / "eval-pass")
    noise = np.random.default_rng(0).integers(0, 256, (len(labels), 1, 16, 16)).astype(np.uint8)
    failed = ev.evaluate_images(noise, labels, dataset.root, params, root / "eval-fail")
    assert passed.passed and not failed.passed
    yield root, params
    mp.undo()


def test_register_promote_rollback(registry, capsys):
    root, params = registry
    name = params.registry.model_name
    # A failed gate registers nothing: the refusal is recorded instead.
    refused = rg.register(params, root / "export", root / "eval-fail")
    assert refused["registered"] is False and refused["refused"] and "gate failed" in refused["reason"]
    assert json.loads((root / "artifacts" / "register" / "register.json").read_text())["registered"] is False
    with pytest.raises(rg.RegistryError, match="has no @candidate"):
        rg.promote(params)

    v1 = rg.register(params, root / "export", root / "eval-pass")
    assert (v1["version"], v1["gate"], v1["alias"], v1["registered"]) == (1, "passed", "candidate", True)
    version, path, tags = reg.resolve_alias(params, "candidate")
    assert version == 1 and path.name == "model.onnx"
    for key in ("onnx_sha256", "classes", "z_dim", "img_resolution", "img_channels", "variant", "git_commit",
                "data_md5", "params_digest", "gate", "gate_level", "gate_release_passed", "classifier_version", "run_id"):
        assert tags[key], key
    assert (tags["gate_level"], tags["gate_release_passed"]) == ("release", "true")
    # A version whose gate failed (tagged by hand, or registered by an older release) is still never promoted.
    client = reg.client(params)
    client.set_model_version_tag(name, "1", "gate", "failed")
    client.set_model_version_tag(name, "1", "gate_failed", json.dumps(["cond_acc/NORMAL"]))
    assert json.loads(tags["classes"]) == list(CLASSES) and tags["data_md5"] == "test-md5"
    assert tags["onnx_sha256"] == json.loads((root / "export" / "export.json").read_text())["sha256"]

    with pytest.raises(rg.RegistryError, match=r"refusing to promote .* v1 .*gate failed.*failed checks: "):
        rg.promote(params)
    with pytest.raises(rg.RegistryError, match="does not exist"):
        reg.resolve_alias(params, "champion")

    v2 = rg.register(params, root / "export", root / "eval-pass")["version"]
    assert rg.promote(params)["champion"] == v2 == 2
    v3 = rg.register(params, root / "export", root / "eval-pass")["version"]
    assert reg.resolve_alias(params, "candidate")[0] == v3 == 3
    assert rg.promote(params, v3) == {"model": name, "champion": 3, "previous": 2, "changed": True}
    assert rg.promote(params, v3)["changed"] is False

    clf_version, clf_path, clf_tags = reg.resolve_alias(params, "champion", params.registry.classifier_name)
    assert clf_path.name == "model.onnx" and str(clf_version) == reg.resolve_alias(params, "champion")[2]["classifier_version"]

    assert rg.rollback(params) == {"model": name, "champion": 2, "rolled_back_from": 3}
    assert reg.resolve_alias(params, "champion")[0] == 2
    with pytest.raises(rg.RegistryError, match="no previous"):
        rg.rollback(params)

    # The CLI says why it refuses, in one line, and exits non-zero.
    flags = ["--profile", "tiny", "--set", f"paths.mlflow_uri={params.paths.mlflow_uri}",
             "--set", f"paths.mlflow_artifacts={params.paths.mlflow_artifacts}", "--set", f"paths.artifacts={params.paths.artifacts}"]
    assert main(["promote", *flags, "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to promote" in err and "Traceback" not in err
    assert main(["promote", *flags, "--version", "3"]) == 0
    assert "-> v3 (was v2)" in capsys.readouterr().out
    assert main(["rollback", *flags]) == 0
    assert reg.resolve_alias(params, "champion")[0] == 2


def test_resolve_refuses_a_corrupt_artefact(registry):
    from mlflow import MlflowClient

    root, params = registry
    version = rg.register(params, root / "export", root / "eval-pass")["version"]
    MlflowClient().set_model_version_tag(params.registry.model_name, str(version), "onnx_sha256", "0" * 64)
    with pytest.raises(rg.RegistryError, match="sha256"):
        reg.resolve_alias(params, "candidate", dst_dir=root / "dl")


def test_register_refuses_an_export_that_changed(registry, tmp_path):
    root, params = registry
    shutil.copytree(root / "export", tmp_path / "export")
    with open(tmp_path / "export" / "generator.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(rg.RegistryError, match="differs from export.json"):
        rg.register(params, tmp_path / "export", root / "eval-pass")


def test_register_refuses_an_evaluation_of_another_generator(registry, tmp_path):
    root, params = registry
    shutil.copytree(root / "eval-pass", tmp_path / "eval")
    summary = json.loads((tmp_path / "eval" / "evaluate.json").read_text())
    summary["generator"] = {"sha256": "f" * 64}
    (tmp_path / "eval" / "evaluate.json").write_text(json.dumps(summary))
    with pytest.raises(rg.RegistryError, match="evaluate the exported generator"):
        rg.register(params, root / "export", tmp_path / "eval")


def test_promote_moves_the_encoder_trained_for_that_generator(registry):
    from mlflow import MlflowClient

    root, params = registry
    client, enc = reg.client(params), params.registry.encoder_name
    gen_sha = json.loads((root / "export" / "export.json").read_text())["sha256"]
    versions = {}
    for label, sha in (("match", gen_sha), ("other", "e" * 64)):  # registered in this order: the newest does not match
        info = reg.log_onnx_model(root / "eval-pass" / "classifier.onnx", enc)  # any small ONNX stands in for the encoder file
        versions[label] = str(info.registered_model_version)
        client.set_model_version_tag(enc, versions[label], "generator_onnx_sha256", sha)
        client.set_model_version_tag(enc, versions[label], "onnx_sha256", "d" * 64)  # components/encoder.py tags it; promote signs it
    version = rg.register(params, root / "export", root / "eval-pass")["version"]
    rg.promote(params, version)
    assert str(client.get_model_version_by_alias(enc, params.registry.champion_alias).version) == versions["match"]


def test_registered_version_carries_signature_lineage_linked_metrics_and_card(registry, tmp_path, monkeypatch):
    """What an MLflow user looks for on a version page: signature + input example, metrics on the
    logged model, the training run, data md5, git commit, gate level/verdict, the model card."""
    import mlflow
    from mlflow.models import Model

    from radsynth import model_card
    from radsynth.tracking import setup_mlflow

    root, params = registry
    setup_mlflow(params)
    with mlflow.start_run(run_name="train-fixture") as train_run:             # the training run the sidecar names
        pass
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    sidecar = json.loads((root / "G_ema.json").read_text())
    (train_dir / "G_ema.json").write_text(json.dumps({**sidecar, "train_run_id": train_run.info.run_id, "kimg": 1.2}))
    (train_dir / "train.json").write_text(json.dumps({"kimg": 1.2, "seconds": 3.5, "device": "cpu"}))
    eval_dir = tmp_path / "eval"
    shutil.copytree(root / "eval-pass", eval_dir)
    gate = json.loads((eval_dir / "gate.json").read_text())
    (eval_dir / "gate.json").write_text(json.dumps({**gate, "level": "demo", "release_passed": False}))
    (eval_dir / "calibration.json").write_text(json.dumps({"summary": "ECE 0.031 on real test images", "ece": 0.031}))
    monkeypatch.setenv("RADSYNTH_GIT_COMMIT", "feedc0de" * 5)

    out = rg.register(params, root / "export", eval_dir, root / "artifacts" / "dataset", train_dir)
    client = reg.client(params)
    mv = client.get_model_version(params.registry.model_name, str(out["version"]))
    tags = mv.tags
    assert tags["train_run_id"] == out["train_run_id"] == train_run.info.run_id
    assert tags["git_commit"] == "feedc0de" * 5 and tags["data_md5"] == "test-md5"
    assert (tags["gate"], tags["gate_level"], tags["gate_release_passed"]) == ("passed", "demo", "false")
    assert json.loads(tags["display_names"])["PNEUMONIA_VIRAL"] == "Viral pneumonia"

    # signature and input example, stored with the model and valid for it
    stored = Model.load(f"models:/{params.registry.model_name}/{out['version']}")
    assert [i["name"] for i in stored.signature.inputs.to_dict()] == ["z", "class"]
    assert tuple(stored.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 16, 16)
    assert stored.saved_input_example_info["artifact_path"] == "input_example.json"
    example = stored.load_input_example(mlflow.artifacts.download_artifacts(f"models:/{params.registry.model_name}/{out['version']}"))
    assert example["z"].shape == (2, 16) and example["class"].tolist() == [0, 1]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{params.registry.model_name}/{out['version']}")
    images = pyfunc.predict(example)["image"]
    assert images.shape == (2, 1, 16, 16) and np.isfinite(images).all()

    # the evaluation metrics hang on the logged model (MLflow 3), the classifier's accuracy on its own
    logged = mlflow.get_logged_model(out["model_id"])
    linked = {m.key: m.value for m in logged.metrics}
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert linked["gate_passed"] == 1.0 and linked["cond_acc"] == pytest.approx(metrics["cond_acc"])
    assert set(linked) == {k for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}

    # the model card: the version's description, an artefact of the run, a file beside register.json
    card = (root / "artifacts" / "register" / "model_card.md").read_text()
    assert mv.description == card and len(card) <= model_card.DESCRIPTION_LIMIT
    for needle in ("Research use only", "passed at demo level (not a release)", train_run.info.run_id, "feedc0de",
                   "test-md5", "| Viral pneumonia | `PNEUMONIA_VIRAL` | 60 | 20 | 20 | 100 |", "| all |  | 180 | 60 | 60 | 300 |",
                   "ECE 0.031 on real test images", "## Training recipe", "1.2 kimg in 3.5 s on cpu", "## Intended use",
                   "## Limits", "](model_card_grid.png)"):
        assert needle in card, needle
    assert "release level" not in card.replace("not a release", "")          # a demo-level model is never labelled release
    for check in gate["checks"]:
        assert f"| {check['name']} |" in card
    assert out["model_card"] == tags["model_card"] == f"runs:/{out['run_id']}/model_card/model_card.md"
    arts = {a.path for a in client.list_artifacts(out["run_id"], "model_card")}
    assert arts == {"model_card/model_card.md", "model_card/model_card_grid.png"}
    from PIL import Image

    grid = Image.open(root / "artifacts" / "register" / "model_card_grid.png")
    assert grid.height >= 3 * 16 and grid.width > params.registry.card_grid_per_class * 16   # three rows, labelled


def test_gate_level_labels():
    from radsynth.model_card import gate_level

    assert gate_level({"passed": True}).label() == "passed (gate level not recorded: not a release)"
    assert gate_level({"passed": True, "level": "demo", "release_passed": False}).label() == "passed at demo level (not a release)"
    assert gate_level({"passed": True, "level": "release", "release_passed": True}).is_release
    assert not gate_level({"passed": False, "level": "release"}).is_release
    assert not gate_level({"passed": True, "level": "release", "release_passed": False}).is_release
    assert not gate_level({"passed": True, "level": "bogus"}).is_release


def test_card_stays_within_the_registry_description_limit():
    from radsynth import model_card

    long_card = "x" * 9000
    short = model_card.description(long_card, "compact " * 10, "runs:/r/model_card/model_card.md")
    assert short == "compact " * 10
    clipped = model_card.description(long_card, "y" * 7000, "runs:/r/model_card/model_card.md")
    assert len(clipped) <= model_card.DESCRIPTION_LIMIT and clipped.endswith("runs:/r/model_card/model_card.md`.)\n")


def test_renaming_the_model_in_one_key_reaches_register_serve_and_the_client(registry, tmp_path):
    """docs/own-data.md: `registry.model_name` is the one key to change. Register and promote under
    the new name, build the repository and start a real tritonserver from the registry, generate
    through the client: every step finds the renamed model, none looks for the default name."""
    from serving.client import Client
    from serving.repository import build_repository
    from serving.server import TritonServer, free_port
    from tests.components.evaldata import eval_params

    root, _ = registry
    renamed = eval_params(tmp_path, **{
        "registry.model_name": "radsynth-brain",
        "serve.repository": str(tmp_path / "model_repository"),
        "serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port(),
        "serve.retries": 1, "serve.backoff_s": 0.05, "serve.timeout_s": 20.0,
    })
    assert renamed.serve.models == ("radsynth-brain",) and renamed.serve.aliases == ("champion",)
    out = rg.register(renamed, root / "export", root / "eval-pass")
    assert out["registered"] and out["model"] == "radsynth-brain"
    assert rg.promote(renamed)["champion"] == out["version"]
    client = reg.client(renamed)
    assert [m.name for m in client.search_registered_models(f"name='{params_default_name()}'")] == []
    repo = build_repository(renamed)
    assert (repo / "radsynth-brain").is_dir() and not (repo / params_default_name()).exists()
    with TritonServer(renamed.serve, repo, log_path=tmp_path / "tritonserver.log"):
        with Client.from_params(renamed) as generator:
            assert generator.model_name == "radsynth-brain"
            sample = generator.sample(CLASSES[0], 2, 5)
    assert (sample.model_name, sample.model_version) == ("radsynth-brain", str(out["version"]))
    assert sample.images.shape[0] == 2 and sample.images.dtype == np.uint8


def params_default_name() -> str:
    from radsynth.config import RegistryConfig

    return RegistryConfig().model_name
