"""Fixtures for the web app tests.

Unit tests drive the Flask app with its test client and an in-process backend that runs a
real tiny generator (``model.registry.build_networks``, tiny profile) and a real encoder in
PyTorch: the web layer (validation, CSRF, pages, audit, downloads) is what they test. The
browser tests (``test_e2e.py``, ``test_study_e2e.py``) run the same app under gunicorn (started
by ``stack.py``; ``test_e2e.py`` against a real tritonserver) in the :func:`browser` here.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from radsynth import metric_keys as mk
from radsynth.config import Params, load_params
from serving.web.backend import ModelInfo

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT.parent / "shared" / "data" / "dicom-fixtures"
CHEST_DX = FIXTURES / "chest_DX_nih_nhsx.dcm"
CLASSES = ("NORMAL", "PNEUMONIA_BACTERIAL", "PNEUMONIA_VIRAL")
ARTIFACTS = ROOT / "tests" / "artifacts"         # browser screenshots (git-ignored)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


class TorchBackend:
    """The served models' interface, answered in process by real tiny PyTorch networks."""

    def __init__(self, params: Params, metrics: dict[str, float] | None = None, unavailable: dict[str, str] | None = None):
        from model.encoder import Encoder
        from model.registry import build_networks

        torch.set_num_threads(1)
        self.G, _ = build_networks(params.model, len(CLASSES), 1, 16, seed=0)
        self.G.eval().requires_grad_(False)
        torch.manual_seed(0)
        self.E = Encoder(self.G.z_dim, 16, 1, channels=8).eval()
        self.calls: list[str] = []
        self.info = ModelInfo(
            name="radsynth-generator", version="2", alias="champion", registry_version="2",
            classes=CLASSES, z_dim=int(self.G.z_dim), img_resolution=16, img_channels=1,
            metrics=dict(metrics if metrics is not None else {
                mk.FID_DOMAIN: 41.5, mk.FID_DOMAIN + mk.REF_SUFFIX: 3.25, mk.per_class(mk.FID_DOMAIN, "NORMAL"): 39.0,
                mk.KID_DOMAIN: 0.031, mk.PRECISION: 0.62, mk.RECALL: 0.48, mk.COND_ACC: 0.875,
                mk.REAL_ACC: 0.93, mk.MEMORISATION_SHARE: 0.0,
            }),
            unavailable=dict(unavailable if unavailable is not None else {
                mk.FID_INCEPTION: "InceptionV3 weights file not present",
            }),
            tags={"gate": "passed"}, registry_note=None, encoder_ready=True, classifier_ready=False,
        )

    def model_info(self) -> ModelInfo:
        return self.info

    @torch.no_grad()
    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
        self.calls.append("generate")
        return self.G(torch.from_numpy(z), torch.from_numpy(classes)).numpy()

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        self.calls.append("encode")
        return self.E(torch.from_numpy(images)).numpy()

    def classify(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - classifier_ready is False
        raise AssertionError("the classifier is not served in these tests")


class StaticCards:
    """Model cards held in memory, keyed by (name, version): the page's card source without a registry."""

    def __init__(self, cards: dict[tuple[str, str], tuple[str, bytes | None]]):
        self.cards = cards

    def get(self, name: str, version: str):
        from serving.web.card import Card

        if (name, version) not in self.cards:
            return Card(name, version, "", None, f"{name} v{version} was registered without a model card")
        markdown, grid = self.cards[(name, version)]
        return Card(name, version, markdown, grid, None)


@pytest.fixture
def params(tmp_path) -> Params:
    return load_params(ROOT / "params.yaml", profile="tiny", overrides={
        "web.audit_log": str(tmp_path / "audit.jsonl"),
        "web.upload_dir": str(tmp_path / "uploads"),
        "web.max_upload_bytes": 4 * 2**20,
        "web.max_pixels": 2048 * 2048,
        "web.max_images": 4,
    })


@pytest.fixture
def backend(params) -> TorchBackend:
    return TorchBackend(params)


@pytest.fixture
def app(params, backend):
    from serving.web.app import create_app

    app = create_app(params, backend=backend, cards=StaticCards({}))
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def csrf(client) -> str:
    """GET the home page and return its CSRF token (the session cookie is kept by the client)."""
    page = client.get("/").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def post_generate(client, data: bytes | None = None, filename: str = "upload.bin", **fields):
    form = {"csrf_token": csrf(client), "condition": "NORMAL", "n": "1", "seed": "7"}
    form.update({k: str(v) for k, v in fields.items()})
    if data is not None:
        form["image"] = (io.BytesIO(data), filename)
    return client.post("/generate", data=form, content_type="multipart/form-data")


def alert(html: str) -> str:
    m = re.search(r'role="alert"[^>]*>(.*?)</div>', html, re.S)
    return re.sub(r"<[^>]+>", "", m.group(1)).strip() if m else ""


@dataclasses.dataclass
class Helpers:
    csrf = staticmethod(csrf)
    post_generate = staticmethod(post_generate)
    alert = staticmethod(alert)


@pytest.fixture
def h() -> Helpers:
    return Helpers()


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright (one per test module)."""
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (make test installs it)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()
