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
