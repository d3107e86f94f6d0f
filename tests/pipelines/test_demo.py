"""make demo's driver: process handling and the gate message (the full demo runs in `make demo`)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pipelines.demo import Demo, dvc_profile, gate_report, wait_http
from radsynth.config import load_params
from radsynth.errors import RadsynthError

ROOT = Path(__file__).resolve().parents[2]


def test_stop_ends_every_child_and_its_children(tmp_path):
    demo = Demo(dict(os.environ))
    # a child that starts a grandchild: both must be gone after stop()
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    proc = demo.start("sleeper", [sys.executable, "-c", script], tmp_path / "log.txt")
    time.sleep(0.5)
    pgid = os.getpgid(proc.pid)
    demo.stop()
    assert proc.poll() is not None and demo.children == []
    time.sleep(0.5)
    assert live_members(pgid) == []


def live_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not zombies."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_wait_http_fails_early_when_the_service_dies(tmp_path):
    demo = Demo(dict(os.environ))
    proc = demo.start("dies", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")
    started = time.monotonic()
    with pytest.raises(RadsynthError, match="dies exited with status 3"):
        wait_http("http://127.0.0.1:9/", proc, 60, "dies", tmp_path / "log.txt")
    assert time.monotonic() - started < 30
    demo.stop()


def test_gate_report_reads_the_verdict(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={"paths.artifacts": str(tmp_path)})
    assert gate_report(params) == (None, "no gate report")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "gate.json").write_text(json.dumps(
        {"passed": False, "failed": [{"detail": "cond_acc/NORMAL 0.31 < 0.5"}, {"detail": "memorisation_share 0.2 > 0.05"}]}))
    assert gate_report(params) == (False, "cond_acc/NORMAL 0.31 < 0.5; memorisation_share 0.2 > 0.05")


def test_dvc_profile_is_the_params_key(tmp_path):
    assert dvc_profile(ROOT / "params.yaml") == "cpu"          # make demo's default
    (tmp_path / "params.yaml").write_text("profile: tiny\n")
    assert dvc_profile(tmp_path / "params.yaml") == "tiny"
