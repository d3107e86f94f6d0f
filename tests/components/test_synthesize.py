"""`radsynth synthesize`: N per condition or a mix, from a registry alias, chunked through a real
tritonserver, equal to one generate of N; PNG or DICOM with manifest and datasheet; refusals."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from components.synthesize import SynthesisError, parse_mix, plan_counts, synthesize, triton_client
from radsynth.config import SynthesizeConfig, load_params
from radsynth.latent import z_from_seed
from tests.conftest import ROOT
from tests.serving.conftest import MODEL, register_onnx, serving_params
from tests.serving.tiny import CLASSES, make_generator


def test_plan_counts_balanced_total_and_mix():
    assert plan_counts(CLASSES, SynthesizeConfig(per_condition=5)) == {"NORMAL": 5, "PNEUMONIA": 5, "COVID": 5}
    assert plan_counts(CLASSES, SynthesizeConfig(total=10)) == {"NORMAL": 4, "PNEUMONIA": 3, "COVID": 3}
    mix = plan_counts(CLASSES, SynthesizeConfig(total=1000, mix={"NORMAL": 0.7, "COVID": 0.3}))
    assert mix == {"NORMAL": 700, "PNEUMONIA": 0, "COVID": 300}
    odd = plan_counts(CLASSES, SynthesizeConfig(per_condition=3, mix={"NORMAL": 1, "PNEUMONIA": 1, "COVID": 1}))
    assert sum(odd.values()) == 9 and set(odd.values()) == {3}
    with pytest.raises(SynthesisError, match=r"names \['FLU'\]"):
        plan_counts(CLASSES, SynthesizeConfig(mix={"FLU": 1.0}))
    with pytest.raises(SynthesisError, match="not all 0"):
        plan_counts(CLASSES, SynthesizeConfig(mix={"NORMAL": 0.0}))
    assert parse_mix("NORMAL=0.5, COVID=0.5") == {"NORMAL": 0.5, "COVID": 0.5}
    with pytest.raises(SynthesisError, match="expected CONDITION=share"):
        parse_mix("NORMAL:0.5")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A private registry: v1 (gate passed) @champion, v2 (gate failed) @candidate; the ONNX files."""
    import os

    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("synthesize")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)
    params = serving_params(tmp, **{"synthesize.per_condition": 21, "synthesize.seed": 100})
    base = load_params(ROOT / "params.yaml", profile="tiny")
    good = make_generator(tmp / "good" / "generator.onnx", base, seed=3)[1]
    other = make_generator(tmp / "other" / "generator.onnx", base, seed=4)[1]
    register_onnx(params, good, MODEL, "champion")
    register_onnx(params, other, MODEL, "candidate")
    MlflowClient().set_model_version_tag(MODEL, "2", "gate", "failed")
    MlflowClient().set_model_version_tag(MODEL, "1", "model_card", "runs:/abc/model_card/model_card.md")
    yield params, good, other, tmp
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


def onnx_images(path, seed: int, n: int, k: int) -> np.ndarray:
    """uint8 [n, H, W, C]: one run of the ONNX file on z_from_seed(seed, n) (no Triton, no chunks)."""
    import onnxruntime as ort

    from serving.client import to_uint8

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return to_uint8(session.run(["image"], {"z": z_from_seed(seed, n, 16), "class": np.full(n, k, dtype=np.int64)})[0])


def test_png_dataset_is_one_generate_of_n_per_condition_with_manifest_and_datasheet(registry):
    from PIL import Image

    params, good, _, tmp = registry
    out = tmp / "png"
    record = synthesize(params, out_dir=out)                                    # 21 per condition, chunks of 16 (max_batch_size)
    assert params.serve.max_batch_size == 16 < 21
    assert record["counts"] == {c: 21 for c in CLASSES} and record["images"] == 63
    assert record["seeds"] == {"NORMAL": 100, "PNEUMONIA": 101, "COVID": 102}
    assert (record["version"], record["gate"], record["origin"]) == (1, "passed", f"models:/{MODEL}@champion")
    assert record["model_card"] == "runs:/abc/model_card/model_card.md" and record["gate_level"] == "unknown"
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 63 and {r["condition"] for r in rows} == set(CLASSES)
    for k, condition in enumerate(CLASSES):
        mine = [r for r in rows if r["condition"] == condition]
        assert [int(r["index"]) for r in mine] == list(range(21)) and {int(r["seed"]) for r in mine} == {100 + k}
        got = np.stack([np.asarray(Image.open(out / r["file"]))[:, :, None] for r in mine])
        np.testing.assert_array_equal(got, onnx_images(good, 100 + k, 21, k))    # = one generate of 21, whatever the chunks
        for r in mine[:3]:
            assert hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    sheet = (out / "datasheet.md").read_text()
    for needle in ("Research use only", f"`{MODEL}` version 1", "passed (level not recorded): not a release model",
                   "runs:/abc/model_card/model_card.md", "| Normal | `NORMAL` | 21 | 100 |", "63 PNG images"):
        assert needle in sheet, needle
    assert json.loads((out / "datasheet.json").read_text())["onnx_sha256"] == record["onnx_sha256"]


def test_dicom_mix_through_a_running_server_and_the_refusals(registry):
    params, good, other, tmp = registry
    from radsynth.registry import download_version

    mixed = dataclasses.replace(params, synthesize=dataclasses.replace(params.synthesize, total=20, mix={"COVID": 3, "NORMAL": 1}))
    _, stored, _ = download_version(params, 1, MODEL, tmp / "v1")               # the registry's copy of v1
    with triton_client(params, stored) as client:                              # a server already running that version
        record = synthesize(mixed, url=client.url, out_dir=tmp / "dicom", fmt="dicom")
        assert record["served_by"] == client.url and record["counts"] == {"NORMAL": 5, "PNEUMONIA": 0, "COVID": 15}
        # the url serves v1's ONNX, so asking it for another version is refused, and nothing is written
        register_onnx(params, other, MODEL, "other")                          # v3, gate passed, a different ONNX
        with pytest.raises(SynthesisError, match=r"serves .* not radsynth-generator v3"):
            synthesize(params, alias="other", url=client.url, out_dir=tmp / "wrong")
        assert not (tmp / "wrong").exists()
    import pydicom

    files = sorted((tmp / "dicom" / "images" / "COVID").glob("*.dcm"))
    assert len(files) == 15 and not (tmp / "dicom" / "images" / "PNEUMONIA").exists()
    datasets = [pydicom.dcmread(f) for f in files]
    assert len({d.SeriesInstanceUID for d in datasets}) == 1 and sorted(d.InstanceNumber for d in datasets) == list(range(1, 16))
    assert datasets[0].BodyPartExamined == "CHEST" and str(datasets[0].PatientName) == "SYNTHETIC^RADSYNTH"
    first = datasets[[d.InstanceNumber for d in datasets].index(1)]
    np.testing.assert_array_equal(first.pixel_array, onnx_images(good, 102, 15, 2)[0, :, :, 0])
    done = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", str(files[-1])], capture_output=True, text=True)
    assert "Error" not in done.stdout + done.stderr, done.stderr

    with pytest.raises(SynthesisError, match=r"refusing to synthesize from radsynth-generator v2: its evaluation gate failed"):
        synthesize(params, alias="candidate", out_dir=tmp / "refused")
    assert not (tmp / "refused").exists()


def test_cli_says_what_went_wrong_in_one_line(registry, capsys):
    from radsynth.cli import main

    params, _, _, tmp = registry
    flags = ["--profile", "tiny", "--set", f"paths.mlflow_uri={params.paths.mlflow_uri}",
             "--set", f"paths.artifacts={params.paths.artifacts}"]
    assert main(["synthesize", *flags, "--mix", "NORMAL:1"]) == 2
    assert main(["synthesize", *flags, "--alias", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "expected CONDITION=share" in err and "models:/radsynth-generator@nosuch does not exist" in err
    assert "Traceback" not in err


def test_a_refused_registration_is_recorded_not_synthesized(tmp_path, capsys):
    """Under DVC (--allow-refusal) a failed gate's refused registration ends the pipeline with a record, exit 0."""
    from radsynth.cli import main

    art = tmp_path / "artifacts"
    (art / "register").mkdir(parents=True)
    reason = "the evaluation gate failed at demo level (gate.json): fid_domain_units/NORMAL 14.2 > 10"
    (art / "register" / "register.json").write_text(json.dumps({"registered": False, "refused": True, "reason": reason}))
    flags = ["--profile", "tiny", "--set", f"paths.artifacts={art}", "--set", f"paths.mlflow_uri=sqlite:///{tmp_path}/none.db"]
    assert main(["synthesize", *flags, "--allow-refusal"]) == 0
    record = json.loads((art / "synthesize" / "synthesize.json").read_text())
    assert record["refused"] is True and record["images"] == 0 and record["reason"] == reason
    assert "synthesis refused" in capsys.readouterr().out
    # without the flag the same command tries the registry (and says why it cannot, in one line)
    assert main(["synthesize", *flags]) == 2
    assert "Traceback" not in capsys.readouterr().err
