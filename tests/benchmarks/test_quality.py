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
