"""The gate: two levels in reference units, readable reasons, the gate.json contract, a failed
gate as a recorded result (exit 0 under DVC, refusals downstream), pictures and reports."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from components import evaluate as ev
from components import export as ex
from radsynth import metric_keys as mk
from radsynth.cli import main
from radsynth.config import EvalConfig, GateConfig, GateLevelConfig
from radsynth.gate import gate_verdict, refusal
from tests.components.evaldata import CLASSES, eval_params, make_dataset, save_tiny_generator, synth_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    params = eval_params(root)
    dataset = make_dataset(root / "artifacts" / "dataset")
    return root, params, dataset


def _values(units: float = 1.5, acc: float = 0.9) -> dict[str, float]:
    values = {mk.MEMORISATION_SHARE: 0.01, mk.MEMORISATION_SHARE_FEATURE: 0.0}
    for c in ("A", "B"):
        values.update({mk.per_class(mk.COND_ACC, c): acc, mk.per_class(mk.REAL_ACC, c): 0.9,
                       mk.per_class(mk.FID_DOMAIN, c): 3.0 * units, mk.per_class(mk.FID_DOMAIN, c) + mk.REF_SUFFIX: 3.0,
                       mk.per_class(mk.FID_DOMAIN, c) + mk.REF_SD_SUFFIX: 0.4, mk.per_class(mk.FID_DOMAIN_UNITS, c): units,
                       mk.per_class(mk.MS_SSIM_DIVERSITY, c): 0.3})
    return values


CFG = EvalConfig(gate=GateConfig(level="demo", release=GateLevelConfig(max_fid_units=2.0, min_cond_acc=0.5, cond_acc_ratio=0.0),
                                 demo=GateLevelConfig(max_fid_units=10.0, min_cond_acc=0.4, cond_acc_ratio=0.0)))


def test_gate_names_the_failed_condition_and_the_gap_in_reference_units():
    values = _values()
    assert ev.apply_gate(values, ["A", "B"], CFG, "release").passed
    values[mk.per_class(mk.COND_ACC, "B")] = 0.2
    values[mk.per_class(mk.FID_DOMAIN_UNITS, "A")] = 2.5
    gate = ev.apply_gate(values, ["A", "B"], CFG, "release")
    assert not gate.passed and gate.level == "release"
    assert [c.name for c in gate.failed] == ["fid_domain_units/A", "cond_acc/B"]
    fid = gate.failed[0]
    assert fid.threshold == 2.0 and fid.margin == pytest.approx(-0.25)
    assert "fid_domain_units/A = 2.5 exceeds the limit 2 by 0.5 (25%)" in fid.detail
    assert "against 3 +- 0.4 for real training images of the same count" in fid.detail
    assert "cond_acc/B = 0.2 is 0.3 below the minimum 0.5 (60%)" in gate.failed[1].detail
    del values[mk.MEMORISATION_SHARE]
    gate = ev.apply_gate(values, ["A", "B"], CFG, "release")
    assert "memorisation_share: not computed" in gate.summary()


def test_two_levels_judge_the_same_numbers_differently():
    values = _values(units=4.0)
    release, demo = (ev.apply_gate(values, ["A", "B"], CFG, lvl) for lvl in ("release", "demo"))
    assert not release.passed and demo.passed
    assert ev.apply_gate(values, ["A", "B"], CFG).level == "demo"      # the configured level
    with pytest.raises(ValueError, match="eval.gate.level must be one of release, demo"):
        GateConfig(level="lenient")


def test_condition_accuracy_minimum_is_relative_to_the_real_accuracy_of_that_condition():
    cfg = EvalConfig(gate=GateConfig(release=GateLevelConfig(min_cond_acc=0.4, cond_acc_ratio=0.75)))
    values = {mk.per_class(mk.COND_ACC, "A"): 0.49, mk.per_class(mk.REAL_ACC, "A"): 0.62,    # minimum 0.465: pass
              mk.per_class(mk.COND_ACC, "B"): 0.60, mk.per_class(mk.REAL_ACC, "B"): 0.90,    # minimum 0.675: fail
              mk.per_class(mk.COND_ACC, "C"): 0.38, mk.per_class(mk.REAL_ACC, "C"): 0.40,    # floor 0.4: fail
              mk.per_class(mk.COND_ACC, "D"): 0.90}                                           # no real accuracy: fail
    checks = {c.condition: c for c in ev.apply_gate(values, list("ABCD"), cfg).checks if c.metric.startswith(mk.COND_ACC)}
    assert checks["A"].passed and checks["A"].threshold == pytest.approx(0.465)
    assert not checks["B"].passed and checks["B"].threshold == pytest.approx(0.675)
    assert "0.75 x its accuracy on real images 0.9" in checks["B"].detail
    assert not checks["C"].passed and checks["C"].threshold == pytest.approx(0.4)
    assert not checks["D"].passed


def test_a_calibration_the_thresholds_get_wrong_fails_the_gate():
    cal = {"rows": [{"name": "blurred", "levels": {"release": {"as_expected": False}, "demo": {"as_expected": True}}},
                    {"name": "noise", "levels": {"release": {"as_expected": True}, "demo": {"as_expected": True}}}]}
    check = ev.calibration_check(cal, "release")
    assert not check.passed and "calibration sets blurred" in check.detail and "eval.gate.release" in check.detail
    assert ev.calibration_check(cal, "demo").passed and ev.calibration_check(None, "demo") is None
    bad_utility = ev.utility_check({mk.TRTR_GAP: 0.2}, EvalConfig())
    assert not bad_utility.passed and "evaluation is invalid" in bad_utility.detail
    assert ev.utility_check({}, EvalConfig()) is None


def test_untrained_generator_fails_and_the_verdict_is_recorded(world, capsys):
    root, params, dataset = world
    gen = save_tiny_generator(root / "train" / "G_ema.safetensors")
    out = root / "eval-untrained"
    result = ev.evaluate(params, gen, dataset.root, out)
    assert not result.passed and not result.release_passed
    failed = {c.name for c in result.gate.failed}
    assert failed & {mk.per_class(mk.COND_ACC, c) for c in CLASSES} or failed & {mk.per_class(mk.FID_DOMAIN_UNITS, c) for c in CLASSES}
    report = (out / "gate.md").read_text()
    assert report.startswith("# Evaluation gate: FAILED at release level")
    assert "exceeds the limit" in report or "below the minimum" in report
    assert "## Distances in reference units" in report and "## The judge" in report
    gate = json.loads((out / "gate.json").read_text())
    assert gate["passed"] is False and gate["failed"] and gate["level"] == "release" and gate["release_passed"] is False
    for c in CLASSES:
        d = gate["distances"][c]
        assert d["units"] == pytest.approx(d["fid_domain"] / d["reference"]) and d["limits"]["release"] == 50.0
    assert set(gate["judge"]["real_acc"]) == set(CLASSES) and gate["calibration"] == {"ran": False, "ok": {}}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[mk.GATE_PASSED] == 0.0 == metrics[mk.GATE_RELEASE_PASSED] and mk.FID_INCEPTION not in metrics
    summary = json.loads((out / "evaluate.json").read_text())
    assert summary["protocol"]["samples"]["generated"] == {c: 24 for c in CLASSES}
    assert summary["generator"]["sha256"] and mk.FID_INCEPTION in summary["unavailable"]
    assert summary["judge"]["report"]["test"]["balanced"] > 0.8
    for picture in ("samples.png", "confusion.png", "nearest.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "FAILED at release level" in page
    assert gate_verdict(out) == "failed"

    flags = ["--profile", "tiny", "--set", f"paths.artifacts={root / 'artifacts'}", "--set", f"eval.cache_dir={root / 'cache'}",
             "--set", f"eval.inception_weights={root / 'absent.pth'}"]
    args = ["evaluate", *flags, "--generator", str(gen), "--dataset", str(dataset.root), "--out", str(root / "eval-cli")]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "gate FAILED" in text and "unavailable: fid_inception" in text
    assert main([*args, "--allow-fail"]) == 0        # as dvc.yaml runs it: the verdict is in gate.json
    assert gate_verdict(root / "eval-cli") == "failed"

    # Downstream steps read the verdict and refuse, on record.
    refused = ex.export(params, gen, root / "export-refused", gate_dir=out)
    assert refused["refused"] and "gate failed at release level" in refused["reason"]
    assert json.loads((root / "export-refused" / "export.json").read_text())["refused"] is True
    assert not (root / "export-refused" / "generator.onnx").exists()
    cli = ["export", "--profile", "tiny", "--generator", str(gen), "--out", str(root / "export-cli"), "--gate", str(out)]
    assert main(cli) == 1 and main([*cli, "--allow-refusal"]) == 0
    assert "export refused" in capsys.readouterr().out


def test_a_generator_returning_training_images_is_caught_by_memorisation(world):
    root, params, dataset = world
    real_train, labels = dataset.images(16, "train"), dataset.split_labels("train")
    pick = np.concatenate([np.flatnonzero(labels == i)[:24] for i in range(len(CLASSES))])
    result = ev.evaluate_images(np.ascontiguousarray(real_train[pick]), labels[pick], dataset.root, params, root / "eval-copy")
    assert not result.passed
    failed = {c.name: c for c in result.gate.failed}
    assert mk.MEMORISATION_SHARE in failed and failed[mk.MEMORISATION_SHARE].value == 1.0
    assert "memorisation" in failed[mk.MEMORISATION_SHARE].detail
    # Everything else about those images is perfect: it is memorisation alone that fails them.
    assert set(failed) == {mk.MEMORISATION_SHARE, mk.MEMORISATION_SHARE_FEATURE}


def test_plausible_new_images_pass_and_a_demo_level_pass_is_not_a_release(world):
    root, params, dataset = world
    labels = np.repeat(np.arange(len(CLASSES)), params.eval.samples_per_class)
    images = synth_images(labels, 16, seed=123)
    result = ev.evaluate_images(images, labels, dataset.root, params, root / "eval-good", expected_resolution=16)
    assert result.passed and result.release_passed, result.gate.summary()
    assert (root / "eval-good" / "classifier.onnx").is_file()
    assert gate_verdict(root / "eval-good") == "passed" and refusal(root / "eval-good", "export") is None

    # The same images judged at demo level, with a release limit they miss: passed, but labelled demo.
    units = max(result.values[mk.per_class(mk.FID_DOMAIN_UNITS, c)] for c in CLASSES)
    gate = dataclasses.replace(params.eval.gate, level="demo", release=dataclasses.replace(params.eval.gate.release, max_fid_units=units / 2))
    demo = dataclasses.replace(params, eval=dataclasses.replace(params.eval, gate=gate))
    out = ev.evaluate_images(images, labels, dataset.root, demo, root / "eval-demo", expected_resolution=16)
    record = json.loads((root / "eval-demo" / "gate.json").read_text())
    assert out.passed and not out.release_passed
    assert record["passed"] is True and record["level"] == "demo" and record["release_passed"] is False
    assert record["release"]["failed"] and all(n.startswith(mk.FID_DOMAIN_UNITS) for n in record["release"]["failed"])
    report = (root / "eval-demo" / "gate.md").read_text()
    assert report.startswith("# Evaluation gate: PASSED at demo level") and "**not** a release-level model" in report
