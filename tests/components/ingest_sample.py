"""One run of ingest -> preprocess -> validate over the whole DVC sample export, shared by
``test_ingest.py``, ``test_preprocess.py`` and ``test_validate.py`` (it is the slow part, so
it runs once per session, through the real CLI, with its console output captured)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

from radsynth.cli import main
from radsynth.config import Params, load_params, parse_override
from tests.conftest import ROOT, SAMPLE

# Fixed salt: the pseudonyms (and so the split) are the same on every run of the tests.
TEST_SALT = "radsynth-tests-fixed-salt-7b1d0c55e2"
SAMPLE_RESOLUTION = 32                          # small arrays keep the byte scans fast


@dataclasses.dataclass(frozen=True)
class SampleRun:
    artifacts: Path
    params: Params
    overrides: tuple[str, ...]                  # --set flags used
    codes: dict[str, int]                       # step -> exit code
    logs: dict[str, str]                        # step -> captured stdout + stderr


def overrides_for(artifacts: Path, salt_file: Path, **extra) -> list[str]:
    values = {
        "paths.artifacts": str(artifacts),
        "data.dicom_dir": str(SAMPLE / "dicom"),
        "data.labels_csv": str(SAMPLE / "labels.csv"),
        "data.salt_env": "",
        "data.salt_file": str(salt_file),
        "data.img_resolution": SAMPLE_RESOLUTION,
        "data.workers": 2,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # JSON is YAML: strings stay strings


def run_cli(step: str, sets: list[str], *extra: str) -> tuple[int, str]:
    """``radsynth <step>`` in-process; returns (exit code, captured stdout + stderr)."""
    out = io.StringIO()
    argv = [step, "--params", str(ROOT / "params.yaml"), "--profile", "tiny", *(a for s in sets for a in ("--set", s)), *extra]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


@functools.cache
def sample_run() -> SampleRun:
    if not (SAMPLE / "labels.csv").is_file():
        raise RuntimeError("data/ is empty: run `make test` (it runs `dvc pull`) or `.venv/bin/dvc pull data.dvc`")
    tmp = Path(tempfile.mkdtemp(prefix="radsynth-ingest-"))
    atexit.register(shutil.rmtree, tmp, True)
    salt_file = tmp / "salt"
    salt_file.write_text(TEST_SALT + "\n")
    sets = overrides_for(tmp / "artifacts", salt_file)
    codes, logs = {}, {}
    for step in ("ingest", "preprocess", "validate"):
        codes[step], logs[step] = run_cli(step, sets)
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides=dict(parse_override(s) for s in sets))
    return SampleRun(tmp / "artifacts", params, tuple(sets), codes, logs)
