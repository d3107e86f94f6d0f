"""A reader study end to end: registry (MLflow) -> Triton serving v1 @champion -> `radsynth study
create` -> three scripted readers answer through the web app -> `radsynth study report` -> tags,
artefacts and the model-card section on v1; then champion moves to v2 and the study stays on v1.

Scripted readers: 1 always right (confidence 5), 2 random with a fixed seed, 3 always "real"
(confidence 3, first condition). The report's figures are checked against closed forms for 1
and 3 and against plain counts of the scripted answers for 2 and for the pooled figures.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from statistics import NormalDist

import numpy as np
import pytest
import torch
from PIL import Image

from radsynth.cli import main
from radsynth.config import load_params
from radsynth.dataset import load_dataset, to_uint8
from radsynth.latent import z_from_seed
from serving.study_store import find_study, hash_token, studies_root
from tests.conftest import ROOT
from tests.serving.conftest import MODEL, register_onnx
from tests.serving.study_helpers import always_real, always_right, make_dataset, random_reader, script
from tests.serving.tiny import CLASSES, make_generator

Z = NormalDist().inv_cdf(0.975)
IMAGES, READERS = 12, 3


def wilson(k: int, n: int) -> tuple[float, float]:
    centre = (k + Z * Z / 2) / (n + Z * Z)
    half = Z / (n + Z * Z) * math.sqrt(k * (n - k) / n + Z * Z / 4)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny):
    """(params, CLI options, G): a registry with v1 @champion, Triton serving it, a prepared dataset."""
    from serving.repository import build_repository
    from serving.server import TritonServer, free_port

    tmp = tmp_path_factory.mktemp("study")
    overrides = {
        "paths.mlflow_uri": f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}", "paths.mlflow_artifacts": str(tmp / "mlruns" / "artifacts"),
        "paths.artifacts": str(tmp / "artifacts"), "serve.repository": str(tmp / "model_repository"),
        "serve.http_port": free_port(), "serve.grpc_port": free_port(), "serve.metrics_port": free_port(),
        "serve.retries": 1, "serve.backoff_s": 0.05, "serve.timeout_s": 20.0, "serve.max_images_per_call": 4,
        "web.audit_log": str(tmp / "audit.jsonl"),
    }
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides=overrides)
    options = ["--profile", "tiny"] + [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
    make_dataset(tmp / "artifacts" / "dataset")
    assert register_onnx(params, tiny[1], MODEL, "champion") == 1
    server = TritonServer(params.serve, build_repository(params))
    server.start()
    try:
        server.wait_ready(90)
        yield params, options, tiny[0]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def created(stack):
    """(study, tokens, stdout) of `radsynth study create --readers 3 --images 12` on @champion."""
    params, options, _ = stack
    code, out, err = run_cli("study", "create", "--readers", str(READERS), "--images", str(IMAGES), "--seed", "424242", *options)
    assert code == 0, err
    tokens = re.findall(r"reader \d+: http://127\.0\.0\.1:8050/study/([A-Za-z0-9_-]+)", out)
    return find_study(studies_root(params)), tokens, out


@pytest.fixture(scope="module")
def answered(stack, created):
    """The scripted readers' answers, submitted through the web app's study page."""
    from serving.web.app import create_app

    params, _, _ = stack
    study, tokens, _ = created
    client = create_app(params).test_client()
    plan = script(study, [always_right, random_reader(7), always_real])
    for reader, rows in plan.items():
        for position, (_, a) in enumerate(rows):
            resp = client.post(f"/study/{tokens[reader - 1]}", data={
                "position": position, "call": a.call, "confidence": a.confidence, "condition": a.condition, "elapsed_ms": 900 + position})
            assert resp.status_code == 303
    return plan


def test_create_resolves_champion_once_and_records_the_study(stack, created):
    params, _, _ = stack
    study, tokens, out = created
    manifest = study.manifest
    assert len(tokens) == READERS and len(set(tokens)) == READERS
    assert f"{MODEL} @champion -> v1" in out and "shown once" in out
    model = manifest["model"]
    assert (model["name"], model["version"], model["alias"]) == (MODEL, 1, "champion")
    from mlflow import MlflowClient

    registry = MlflowClient(params.paths.mlflow_uri, params.paths.mlflow_uri)
    assert model["onnx_sha256"] == registry.get_model_version(MODEL, "1").tags["onnx_sha256"]
    assert manifest["source"]["served_sha256_checked"] is True
    # the answer key lives under the artefacts, tokens only as hashes
    assert study.root.parent == studies_root(params) and str(study.root).startswith(params.paths.artifacts)
    assert [r for r in study.token_hashes] == [hash_token(t) for t in tokens]
    # half real, half synthetic, the same number of each condition in each half
    items = manifest["items"]
    assert sorted(i["kind"] for i in items) == ["real"] * 6 + ["synthetic"] * 6
    for kind in ("real", "synthetic"):
        assert sorted(i["condition"] for i in items if i["kind"] == kind) == sorted(CLASSES * 2)
    assert manifest["seeds"]["study"] == 424242
    assert all(sorted(order) == list(range(IMAGES)) for order in manifest["orders"]) and len(manifest["orders"]) == READERS
    assert len({tuple(o) for o in manifest["orders"]}) > 1          # every reader has an own order


def test_real_images_come_only_from_the_test_split_by_index_and_pixels(stack, created):
    params, _, _ = stack
    study, _, _ = created
    dataset = load_dataset(f"{params.paths.artifacts}/dataset")
    pixels = np.asarray(dataset.images(16))                          # [N, 1, 16, 16]
    real = [i for i in study.manifest["items"] if i["kind"] == "real"]
    for item in real:
        index = item["dataset_index"]
        assert dataset.splits[index] == "test"
        assert dataset.classes[dataset.labels[index]] == item["condition"]
        shown = np.asarray(Image.open(study.image_path(item["item"])))
        matches = [j for j in range(len(dataset)) if np.array_equal(pixels[j, 0], shown)]
        assert matches == [index]                                    # this row and no other (train/val included)
    assert len({i["dataset_index"] for i in real}) == len(real)
    assert "dataset_index" not in json.dumps([i for i in study.manifest["items"] if i["kind"] == "synthetic"])


def test_synthetic_images_are_the_served_model_at_the_recorded_seeds(stack, created):
    _, _, G = stack
    study, _, _ = created
    per_condition = study.manifest["design"]["per_condition"]
    for item in (i for i in study.manifest["items"] if i["kind"] == "synthetic"):
        k = CLASSES.index(item["condition"])
        z = z_from_seed(item["seed"], per_condition[item["condition"]], G.z_dim)[item["row"]:item["row"] + 1]
        with torch.no_grad():
            expected = to_uint8(G(torch.from_numpy(z), torch.tensor([k])).numpy())[0, 0]
        shown = np.asarray(Image.open(study.image_path(item["item"]))).astype(int)
        assert np.abs(shown - expected.astype(int)).max() <= 1       # Triton (ONNX Runtime) vs PyTorch rounding
    seeds = study.manifest["seeds"]["synthetic"]
    assert len(set(seeds)) == len(CLASSES)


def test_scripted_readers_report_equals_closed_forms(stack, created, answered):
    params, options, _ = stack
    study, _, _ = created
    code, out, err = run_cli("study", "report", "--study", study.id, *options)
    assert code == 0, err
    report = json.loads((study.root / "report" / "report.json").read_text())
    assert (study.root / "report" / "report.md").read_text().startswith(f"# Reader study {study.id}")
    r1, r2, r3 = report["readers"]
    half = IMAGES // 2

    # reader 1, always right
    assert r1["accuracy"]["value"] == 1.0 and (r1["accuracy"]["low"], r1["accuracy"]["high"]) == pytest.approx(wilson(IMAGES, IMAGES))
    assert r1["accuracy"]["low"] == pytest.approx(IMAGES / (IMAGES + Z * Z))
    assert r1["accuracy_p_value"] == pytest.approx(2 / 2 ** IMAGES)
    assert r1["synthetic_called_real"]["value"] == 0.0 and r1["synthetic_called_real"]["high"] == pytest.approx(Z * Z / (half + Z * Z))
    assert r1["auc"]["value"] == 1.0
    assert r1["condition_agreement_real"]["value"] == r1["condition_agreement_synthetic"]["value"] == 1.0

    # reader 3, always "real", confidence 3, first condition
    assert r3["accuracy"]["value"] == 0.5
    assert (r3["accuracy"]["low"], r3["accuracy"]["high"]) == pytest.approx((0.5 - Z / (2 * math.sqrt(IMAGES + Z * Z)),
                                                                             0.5 + Z / (2 * math.sqrt(IMAGES + Z * Z))))
    assert r3["accuracy_p_value"] == pytest.approx(1.0)
    assert r3["synthetic_called_real"]["value"] == 1.0 and r3["real_called_real"]["value"] == 1.0
    assert r3["auc"]["value"] == 0.5                                 # one rating for everything: no information
    assert r3["condition_agreement_real"]["value"] == pytest.approx(1 / 3)      # 2 of the 6 real are NORMAL
    assert r3["condition_agreement_synthetic"]["value"] == pytest.approx(1 / 3)

    # reader 2, random (seed 7): plain counts of the scripted answers
    rows = answered[2]
    correct = sum(a.call == item["kind"] for item, a in rows)
    assert r2["accuracy"]["k"] == correct and r2["accuracy"]["value"] == pytest.approx(correct / IMAGES)
    assert (r2["accuracy"]["low"], r2["accuracy"]["high"]) == pytest.approx(wilson(correct, IMAGES))
    syn = [(item, a) for item, a in rows if item["kind"] == "synthetic"]
    assert r2["synthetic_called_real"]["k"] == sum(a.call == "real" for _, a in syn)

    def rating(a):
        return 6 - a.confidence if a.call == "real" else 5 + a.confidence

    def brute_auc(pairs):
        pos = [rating(a) for item, a in pairs if item["kind"] == "synthetic"]
        neg = [rating(a) for item, a in pairs if item["kind"] == "real"]
        return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))

    assert r2["auc"]["value"] == pytest.approx(brute_auc(rows))
    real2 = [(item, a) for item, a in rows if item["kind"] == "real"]
    assert r2["condition_agreement_real"]["k"] == sum(a.condition == item["condition"] for item, a in real2)

    # pooled: all 36 answers
    everything = [pair for reader in (1, 2, 3) for pair in answered[reader]]
    pooled = report["pooled"]
    assert pooled["answers"] == READERS * IMAGES
    assert pooled["accuracy"]["k"] == IMAGES + correct + half
    assert pooled["synthetic_called_real"]["k"] == 0 + r2["synthetic_called_real"]["k"] + half
    assert pooled["auc"]["value"] == pytest.approx(brute_auc(everything))

    # Fleiss' kappa on real vs synthetic over the 12 items, from its definition
    by_item = {}
    for item, a in everything:
        by_item.setdefault(item["item"], []).append(a.call)
    counts = [[calls.count("real"), calls.count("synthetic")] for calls in by_item.values()]
    p_bar = sum((r * r + s * s - READERS) / (READERS * (READERS - 1)) for r, s in counts) / IMAGES
    shares = [sum(c[j] for c in counts) / (IMAGES * READERS) for j in (0, 1)]
    p_e = sum(s * s for s in shares)
    assert report["inter_reader"]["fleiss_kappa_call"] == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert report["inter_reader"]["items"] == IMAGES
    assert report["completeness"] == {"answers": 36, "expected": 36, "complete_readers": 3, "closed": False}

    # logged to v1: tags, artefacts on its run, the model-card section in its description
    from mlflow import MlflowClient

    registry = MlflowClient(params.paths.mlflow_uri, params.paths.mlflow_uri)
    mv = registry.get_model_version(MODEL, "1")
    assert mv.tags["reader_study.id"] == study.id
    assert mv.tags["reader_study.accuracy"] == f"{pooled['accuracy']['value']:.4f}"
    assert mv.tags["reader_study.answers"] == "36/36"
    assert "## Reader study" in mv.description and "research instrument, not a clinical validation" in mv.description.lower()
    logged = {f.path for f in registry.list_artifacts(mv.run_id, f"reader_study/{study.id}")}
    assert logged == {f"reader_study/{study.id}/report.md", f"reader_study/{study.id}/report.json"}
    assert "logged to radsynth-generator version 1" in out


def test_a_study_on_an_older_version_never_attaches_to_a_newer_one(stack, created, answered, tmp_path):
    from mlflow import MlflowClient

    from serving.study import StudyError, report_study

    params, options, _ = stack
    study, _, _ = created
    registry = MlflowClient(params.paths.mlflow_uri, params.paths.mlflow_uri)
    _, onnx2 = make_generator(tmp_path / "g2" / "generator.onnx", params, seed=1)
    assert register_onnx(params, onnx2, MODEL, "champion") == 2        # champion -> v2
    code, _, err = run_cli("study", "report", "--study", study.id, *options)
    assert code == 0, err
    v1, v2 = registry.get_model_version(MODEL, "1"), registry.get_model_version(MODEL, "2")
    assert v1.tags["reader_study.id"] == study.id
    assert not any(k.startswith("reader_study.") for k in v2.tags) and "Reader study" not in (v2.description or "")
    assert v1.description.count("## Reader study") == 1                # replaced, not appended twice

    # a new study now resolves champion to v2; Triton serves only v1, so it refuses clearly
    code, _, err = run_cli("study", "create", "--readers", "1", "--images", "6", *options)
    assert code == 2 and "version 2" in err and "Traceback" not in err

    # if v1 no longer holds the study's ONNX, nothing is logged to it
    registry.set_model_version_tag(MODEL, "1", "onnx_sha256", "f" * 64)
    try:
        with pytest.raises(StudyError, match="not the .* this study was made with"):
            report_study(params, find_study(studies_root(params), study.id))
    finally:
        registry.set_model_version_tag(MODEL, "1", "onnx_sha256", study.manifest["model"]["onnx_sha256"])


def test_list_close_and_clear_errors(stack, created):
    params, options, _ = stack
    study, _, _ = created
    code, out, _ = run_cli("study", "list", *options)
    assert code == 0 and study.id in out and f"{MODEL} v1" in out
    for argv, words in ((["--images", "7"], "even number"), (["--images", "4"], "at least 6"),
                        (["--version", "9"], "does not exist"), (["--readers", "0"], "--readers")):
        code, _, err = run_cli("study", "create", *argv, *options)
        assert code == 2 and words in err and "Traceback" not in err, err
    code, _, err = run_cli("study", "report", "--study", "nope", *options)
    assert code == 2 and "no study 'nope'" in err
