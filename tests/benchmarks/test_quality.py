"""benchmarks/quality.py: the pieces that decide which evaluation a row is and how far inside the gate it is."""

from __future__ import annotations

from benchmarks.quality import evaluation_of, min_margin, relative_margin, run_dir_of
from radsynth.config import parse_override


def test_a_utility_evaluation_has_its_own_folder_and_overrides_a_global_off():
    sets = ["train.recipe=cpu-pgcgan-sa", "seed=1"]
    plain, name = evaluation_of(sets, utility=False)
    assert (plain, name) == (sets, "evaluate") and plain is not sets
    on, name = evaluation_of(sets, utility=True)
    assert name == "evaluate-utility" and on[:2] == sets
    # the script passes --set eval.utility.enabled=false for every step first; the CLI keeps the last value of a key
    resolved = dict(parse_override(s) for s in ["eval.utility.enabled=false", *on])
    assert resolved["eval.utility.enabled"] is True


def test_margins_are_fractions_of_the_threshold_and_the_smallest_names_its_check():
    checks = [{"name": "fid NORMAL", "value": 8.9, "threshold": 10.0, "op": "<="},
              {"name": "cond acc VIRAL", "value": 0.5, "threshold": 0.4, "op": ">="},
              {"name": "info", "value": 1.0, "threshold": None, "op": "<="}]
    assert abs(relative_margin(checks[0]) - 0.11) < 1e-9 and abs(relative_margin(checks[1]) - 0.25) < 1e-9
    assert relative_margin(checks[2]) is None
    assert min_margin(checks) == {"margin": 0.11, "check": "fid NORMAL"}
    failed = {"name": "fid BACT", "value": 12.0, "threshold": 10.0, "op": "<="}
    assert min_margin([*checks, failed]) == {"margin": -0.2, "check": "fid BACT"}
    assert min_margin([checks[2]]) is None


def test_run_folders_keep_variants_and_probes_apart(tmp_path):
    assert run_dir_of(tmp_path, "cpu-pgcgan-sa+x2", 1, []) == tmp_path / "runs" / "cpu-pgcgan-sa+x2-seed1"
    assert run_dir_of(tmp_path, "cpu-pgcgan-sa", 1, [0.5]) == tmp_path / "runs" / "ema-cpu-pgcgan-sa-seed1"


def _run(salt, seed, fd, passed, failed=(), margin=None):
    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    metrics = {f"fid_domain_units/{c}": v for c, v in zip(classes, fd)}
    metrics |= {f"cond_acc/{c}": 0.9 for c in classes} | {f"recall/{c}": 0.5 for c in classes}
    return {"salt": salt, "recipe": "cpu-pgcgan-sa+x", "seed": seed, "metrics": metrics, "gate_passed": passed,
            "gate_failed": list(failed), "gate_min_margin": margin}


def test_report_pools_result_files_and_prints_one_line_per_run(tmp_path, capsys):
    import json

    import pytest

    from benchmarks.quality import main, run_rows
    from radsynth import metric_keys as mk

    assert (mk.COND_ACC, mk.RECALL) == ("cond_acc", "recall")
    a = _run("salt-a", 1, (12.5, 3.0, 4.25), False, ["fid_domain NORMAL"], {"margin": -0.25, "check": "fid_domain NORMAL"})
    b = _run("salt-b", 2, (4.0, 5.0, float("nan")), True, margin={"margin": 0.6, "check": "fid_domain BACTERIAL"})
    (tmp_path / "one.json").write_text(json.dumps({"runs": [a, {"salt": "salt-c", "recipe": "x", "seed": 3, "error": "boom"}]}))
    (tmp_path / "two.json").write_text(json.dumps({"runs": [b, a]}))          # a run in both files counts once
    lines = run_rows([b, a], ["NORMAL", "BACTERIAL", "VIRAL"])
    assert len(lines) == 2 and lines[0].startswith("salt-a")
    assert "FD 12.5 / 3.0 / 4.2" in lines[0] and "FAIL fid_domain NORMAL  -25.0 % (fid_domain NORMAL)" in lines[0]
    assert "4.0 / 5.0 / -" in lines[1] and "pass  60.0 %" in lines[1]
    assert main(["--report", f"{tmp_path / 'one.json'},{tmp_path / 'two.json'}"]) == 0
    out = capsys.readouterr().out
    assert "8.250 +- 6.010" in out           # NORMAL pooled over both files: mean 8.25, sd 6.01
    assert "1 / 2" in out and out.count("salt-") == 2
    (tmp_path / "empty.json").write_text('{"runs": []}')
    with pytest.raises(SystemExit, match="no evaluated runs"):
        main(["--report", str(tmp_path / "empty.json")])
    with pytest.raises(SystemExit, match="not a readable result file"):
        main(["--report", str(tmp_path / "missing.json")])


def test_one_runs_unexpected_error_becomes_its_error_row(tmp_path, monkeypatch):
    import argparse

    import benchmarks.quality as q
    from radsynth.config import ConfigError

    def broken(*a, **k):
        raise ConfigError("params.yaml: unknown key 'train.new_key'")

    monkeypatch.setattr(q, "run_one", broken)
    rows = q.run_one_safely(argparse.Namespace(tag="x"), "salt-a", tmp_path, "cpu-pgcgan-sa", 7, "all")
    assert rows == [{"salt": "salt-a", "recipe": "cpu-pgcgan-sa+x", "seed": 7,
                     "error": "ConfigError: params.yaml: unknown key 'train.new_key' (rerun the same command: finished steps are reused)"}]
