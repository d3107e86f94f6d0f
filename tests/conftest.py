"""Shared fixtures. Tests run from the project root with the sample export pulled by DVC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "data" / "dicom-fixtures"
SAMPLE = ROOT / "data"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each worker and every process
    # it starts computes on one thread, so the workers do not oversubscribe the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
# A fixed promotion-signing pair for the whole suite (radsynth/signing.py): promote signs and serve
# verifies with it, in this process and in every step it starts; no key file is written.
TEST_SIGNING_KEY = "OvfW3sbt/ZvCPXR6rRFtTmSV1moXaeKOR8TKOhsuWbo="
TEST_VERIFY_KEY = "kMNyG8ANmga0oEkuI6Ww5TuczCvRDIKWnSkzYJ9OABo="
os.environ.setdefault("RADSYNTH_SIGNING_KEY", TEST_SIGNING_KEY)
os.environ.setdefault("RADSYNTH_VERIFY_KEY", TEST_VERIFY_KEY)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_export() -> Path:
    """The DVC-pulled sample export (``make test`` runs ``dvc pull`` first)."""
    if not (SAMPLE / "labels.csv").is_file():
        pytest.fail("data/ is empty: run `make test` (it runs `dvc pull`) or `.venv/bin/dvc pull data.dvc`")
    return SAMPLE


@pytest.fixture(scope="session")
def dicom_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"{FIXTURES} missing: shared/ must sit beside the checkout, as in CI")
    return FIXTURES


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (reproducible reductions, no oversubscription of 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- test lanes -------------------------------------------------------------------------
# `fast`: no servers, no subprocess-heavy work, no training or dataset builds: `make test-fast`
# (the edit-test loop, under a minute on 2 cores). `integration`: everything else. CI (`make
# test`) runs both. A test is integration when it is marked so (or `slow`), uses one of these
# fixtures (a tritonserver, a registry, a built dataset, a browser, the pipeline's data), or
# lives in one of these modules; every other test is fast.
INTEGRATION_FIXTURES = {
    "triton", "registry_params", "registry", "stack", "live", "world", "small_export", "eval_cache",
    "dataset", "sample_dataset", "browser", "page", "web_server", "gunicorn",
}
INTEGRATION_MODULES = {
    "tests/components/test_calibration.py", "tests/components/test_evaluate.py", "tests/components/test_ingest.py",
    "tests/components/test_preprocess.py", "tests/components/test_register.py", "tests/components/test_synthesize.py",
    "tests/components/test_train.py", "tests/components/test_validate.py",
    "tests/model/test_classifier.py", "tests/model/test_distributed.py", "tests/model/test_learning_signal.py",
    "tests/model/test_metrics.py", "tests/model/test_tracking.py", "tests/model/test_trainer.py",
    "tests/pipelines/test_demo.py", "tests/pipelines/test_end_to_end.py", "tests/pipelines/test_pipeline.py",
    "tests/serving/test_deploy.py", "tests/serving/test_repository.py", "tests/serving/test_server_client.py",
    "tests/serving/test_signature.py", "tests/serving/test_study.py",
    "tests/serving/web/test_backend.py", "tests/serving/web/test_e2e.py", "tests/serving/web/test_encoder.py",
    "tests/serving/web/test_server.py", "tests/serving/web/test_study_e2e.py",
    "tests/test_dependencies.py", "tests/radsynth/test_pool.py",
}

INTEGRATION_TESTS = {   # single heavy tests in otherwise fast modules (measured: each takes 8 s or more)
    "tests/radsynth/test_cli.py::test_every_subcommand_has_help",
    "tests/radsynth/test_cli.py::test_every_documented_override_is_a_key_the_checker_accepts",
    "tests/model/test_schedule.py::test_schedule_module_and_the_pipeline_stage_list_import_no_torch",
    "tests/model/test_checkpoint.py::test_a_kill_between_the_two_renames_keeps_the_previous_generator",
    "tests/serving/web/test_app.py::test_the_memory_probe_sees_codec_allocations",
    "tests/test_contracts.py::test_every_pipeline_compiles",
    "tests/test_contracts.py::test_same_step_names_in_dvc_kfp_and_components",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
        test = f"{module}::{getattr(item, 'originalname', item.name)}"
        integration = (item.get_closest_marker("integration") is not None or item.get_closest_marker("slow") is not None
                       or module in INTEGRATION_MODULES or test in INTEGRATION_TESTS
                       or bool(INTEGRATION_FIXTURES & set(item.fixturenames)))
        item.add_marker(pytest.mark.integration if integration else pytest.mark.fast)


# A test in the fast lane that turns slow is named at the end of the run (never failed: timed
# assertions do not belong in tests), so whoever added it can mark it `integration` or list it
# above before the lane outgrows its minute.
FAST_LANE_WARN_S = 5.0
_slow_fast: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and "fast" in report.keywords and report.duration > FAST_LANE_WARN_S:
        _slow_fast.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter):
    if _slow_fast:
        terminalreporter.write_sep("-", f"fast-lane tests over {FAST_LANE_WARN_S:.0f} s (mark them integration, tests/conftest.py)")
        for duration, nodeid in sorted(_slow_fast, reverse=True):
            terminalreporter.write_line(f"{duration:6.1f} s  {nodeid}")
