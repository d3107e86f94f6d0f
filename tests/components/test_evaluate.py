"""The gate: untrained and memorising generators fail with readable reasons; plausible images pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components import evaluate as ev
from radsynth import metric_keys as mk
from radsynth.cli import main
from tests.components.evaldata import CLASSES, eval_params, make_dataset, save_tiny_generator, synth_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    params = eval_params(root)
    dataset = make_dataset(root / "artifacts" / "dataset")
    return root, params, dataset


def test_gate_names_the_failed_condition_and_the_gap():
    from radsynth.config import EvalConfig

    cfg = EvalConfig(gate_min_cond_acc=0.5, gate_max_fid_ratio=10, gate_fid_floor=1.0, gate_max_diversity=0.9,
                     gate_max_memorisation=0.05)
    values = {mk.MEMORISATION_SHARE: 0.01, mk.MEMORISATION_SHARE_FEATURE: 0.0}
    for c in ("A", "B"):
        values.update({mk.per_class(mk.COND_ACC, c): 0.9, mk.per_class(mk.FID_DOMAIN, c): 3.0,
                       mk.per_class(mk.FID_DOMAIN, c) + mk.REF_SUFFIX: 0.5, mk.per_class(mk.MS_SSIM_DIVERSITY, c): 0.3})
    assert ev.apply_gate(values, ["A", "B"], cfg).passed
    values[mk.per_class(mk.COND_ACC, "B")] = 0.2
    values[mk.per_class(mk.FID_DOMAIN, "A")] = 12.5  # limit 10 x max(0.5, 1.0) = 10
    gate = ev.apply_gate(values, ["A", "B"], cfg)
    assert not gate.passed
    assert [c.name for c in gate.failed] == ["fid_domain/A", "cond_acc/B"]
    fid = gate.failed[0]
    assert fid.threshold == 10.0 and "fid_domain/A = 12.5 exceeds the limit 10 by 2.5 (25%)" in fid.detail
    assert "cond_acc/B = 0.2 is 0.3 below the minimum 0.5 (60%)" in gate.failed[1].detail
    del values[mk.MEMORISATION_SHARE]
    gate = ev.apply_gate(values, ["A", "B"], cfg)
    assert "memorisation_share: not computed" in gate.summary()


def test_condition_accuracy_minimum_is_relative_to_the_real_accuracy_of_that_condition():
    from radsynth.config import EvalConfig

    cfg = EvalConfig(gate_min_cond_acc=0.4, gate_cond_acc_ratio=0.75)
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
    off = ev.apply_gate(values, ["B"], EvalConfig(gate_min_cond_acc=0.5, gate_cond_acc_ratio=0.0))
    assert [c.passed for c in off.checks if c.metric.startswith(mk.COND_ACC)] == [True]


def test_untrained_generator_fails_the_gate_and_the_cli_exits_nonzero(world, capsys):
    root, params, dataset = world
    gen = save_tiny_generator(root / "train" / "G_ema.safetensors")
    result = ev.evaluate(params, gen, dataset.root, root / "eval-untrained")
    assert not result.passed
    failed = {c.name for c in result.gate.failed}
    assert failed & {mk.per_class(mk.COND_ACC, c) for c in CLASSES} or failed & {mk.per_class(mk.FID_DOMAIN, c) for c in CLASSES}
    report = (root / "eval-untrained" / "gate.md").read_text()
    assert report.startswith("# Evaluation gate: FAILED")
    assert "exceeds the limit" in report or "below the minimum" in report
    gate = json.loads((root / "eval-untrained" / "gate.json").read_text())
    assert gate["passed"] is False and gate["failed"]
    metrics = json.loads((root / "eval-untrained" / "metrics.json").read_text())
    assert metrics[mk.GATE_PASSED] == 0.0 and mk.FID_INCEPTION not in metrics
    summary = json.loads((root / "eval-untrained" / "evaluate.json").read_text())
    assert summary["protocol"]["samples"]["generated"] == {c: 24 for c in CLASSES}
    assert summary["generator"]["sha256"] and mk.FID_INCEPTION in summary["unavailable"]
    assert ev.gate_verdict(root / "eval-untrained") == "failed"

    flags = ["--profile", "tiny", "--set", f"paths.artifacts={root / 'artifacts'}", "--set", f"eval.cache_dir={root / 'cache'}",
             "--set", f"eval.inception_weights={root / 'absent.pth'}"]
    args = ["evaluate", *flags, "--generator", str(gen), "--dataset", str(dataset.root), "--out", str(root / "eval-cli")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "gate FAILED" in out and "unavailable: fid_inception" in out
    assert main([*args, "--allow-fail"]) == 0


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


def test_plausible_new_images_pass(world):
    root, params, dataset = world
    labels = np.repeat(np.arange(len(CLASSES)), params.eval.samples_per_class)
    result = ev.evaluate_images(synth_images(labels, 16, seed=123), labels, dataset.root, params, root / "eval-good",
                                expected_resolution=16)
    assert result.passed, result.gate.summary()
    assert (root / "eval-good" / "classifier.onnx").is_file()
    assert ev.gate_verdict(root / "eval-good") == "passed"
