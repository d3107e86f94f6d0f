"""End to end in a real browser: Chromium (Debian's, driven by Playwright) -> gunicorn running
``radsynth web`` -> a real tritonserver serving generator, encoder and domain classifier,
with the model's facts from a real MLflow registry.

The models are tiny and untrained (the test checks the product's plumbing, not image quality),
but every piece is the real one: ``components.export`` exports the generator, ``radsynth
encoder`` trains/exports/registers the encoder, ``components.register`` registers generator
and classifier and ``promote`` moves ``champion``, ``serving.repository`` builds the model
repository from the registry (the encoder from its local ONNX file), ``serving.server``
runs tritonserver. Only the evaluation's output files are written by hand (numbers chosen
here), because a full evaluation takes minutes.

The result page's screenshot is saved under ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from radsynth import metric_keys as mk

from .conftest import CHEST_DX, CLASSES, ROOT

for _module, _owner in (("serving.client", "serving"), ("serving.repository", "serving"), ("serving.server", "serving"),
                        ("serving.dicom_out", "serving"), ("components.export", "evaluate/export"),
                        ("components.register", "evaluate/export"), ("model.classifier", "evaluate/export")):
    pytest.importorskip(_module, reason=f"{_module} ({_owner} helper) not merged yet")

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
METRICS = {mk.FID_DOMAIN: 38.2, mk.FID_DOMAIN + mk.REF_SUFFIX: 4.1, mk.KID_DOMAIN: 0.027, mk.PRECISION: 0.64,
           mk.RECALL: 0.51, mk.COND_ACC: 0.81, mk.REAL_ACC: 0.92, mk.MEMORISATION_SHARE: 0.0,
           mk.per_class(mk.COND_ACC, "PNEUMONIA_VIRAL"): 0.77}
UNAVAILABLE = {mk.FID_INCEPTION: "InceptionV3 weights file not present (offline machine)",
               mk.KID_INCEPTION: "InceptionV3 weights file not present (offline machine)"}


def _free_port() -> int:
    from serving.server import free_port

    return free_port()


def _pipeline(tmp) -> "Params":  # noqa: F821 - built below
    """Artefacts and registry as the pipeline leaves them, for tiny untrained models."""
    from components.encoder import encoder
    from components.export import export_generator
    from components.register import promote, register
    from model.checkpoint import save_generator
    from model.classifier import ClassifierSpec, DomainClassifier, export_classifier_onnx
    from model.registry import build_networks
    from radsynth.config import load_params
    from radsynth.dataset import save_dataset, to_uint8
    from radsynth.io import write_json
    from radsynth.latent import z_from_seed

    art = tmp / "artifacts"
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    grpc = _free_port()
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={
        "paths.artifacts": str(art), "paths.mlflow_uri": uri, "paths.mlflow_artifacts": str(tmp / "mlruns" / "artifacts"),
        "serve.models": ["radsynth-generator", "radsynth-encoder", "radsynth-classifier"],
        "serve.onnx": {"radsynth-encoder": str(art / "encoder" / "encoder.onnx")},
        "serve.repository": str(tmp / "model_repository"),
        "serve.grpc_port": grpc, "serve.http_port": _free_port(), "serve.metrics_port": _free_port(),
        "web.triton_url": f"127.0.0.1:{grpc}", "web.audit_log": str(tmp / "audit.jsonl"),
        "encoder.steps": 30, "web.max_images": 4,
    })
    torch.set_num_threads(1)
    G, _ = build_networks(params.model, len(CLASSES), 1, 16, seed=0)
    G.eval().requires_grad_(False)
    meta = {"classes": list(CLASSES), "data_md5": "e2e", "params_digest": params.digest(), "variant": G.variant}
    save_generator(art / "train" / "G_ema.safetensors", G, meta)
    c = np.arange(90, dtype=np.int64) % len(CLASSES)
    with torch.no_grad():
        x = to_uint8(G(torch.from_numpy(z_from_seed(1, 90, G.z_dim)), torch.from_numpy(c)).numpy())
    levels = {16: x, 8: x.reshape(90, 1, 8, 2, 8, 2).mean(axis=(3, 5)).astype(np.uint8)}
    save_dataset(art / "dataset", levels, [f"p{i}" for i in range(90)], c, ["train"] * 60 + ["val"] * 20 + ["test"] * 10, CLASSES)

    record = export_generator(G, meta, art / "export" / "generator.onnx", params.export)
    write_json(art / "export" / "export.json", record)
    torch.manual_seed(0)
    clf = DomainClassifier(ClassifierSpec(num_classes=len(CLASSES), img_channels=1, img_resolution=16, width=8)).eval()
    export_classifier_onnx(clf, art / "evaluate" / "classifier.onnx", CLASSES)
    write_json(art / "evaluate" / "metrics.json", METRICS)
    write_json(art / "evaluate" / "gate.json", {"passed": True, "failed": []})
    write_json(art / "evaluate" / "evaluate.json", {"unavailable": UNAVAILABLE, "protocol": {"data_identity": "e2e"}})
    register(params)
    promote(params)
    encoder(params, register=True, progress=False)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # setup_mlflow exports these
        os.environ.pop(key, None)
    return params


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(params, base URL, triton server): the whole serving stack, torn down at the end."""
    from serving.repository import build_repository
    from serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("web-e2e")
    params = _pipeline(tmp)
    triton = TritonServer(params.serve, build_repository(params))
    triton.start()
    web = None
    try:
        triton.wait_ready(120)
        port = _free_port()
        sets = [f"paths.mlflow_uri={params.paths.mlflow_uri}", f"web.triton_url={params.web.triton_url}",
                f"web.audit_log={params.web.audit_log}", "web.max_images=4"]
        cmd = [sys.executable, "-m", "radsynth.cli", "web", "--profile", "tiny", "--port", str(port), "--workers", "2"]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RADSYNTH_WEB_SECRET": "e2e-secret"}
        env.pop("MLFLOW_TRACKING_URI", None)
        web = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        banner = web.stdout.readline()  # "radsynth web: serving on <url> ..." once gunicorn is ready
        assert f"serving on {url}" in banner, banner + (web.stdout.read() if web.poll() is not None else "")
        _wait_http(url + "healthz", 60)
        yield params, url, triton
    finally:
        if web is not None:
            os.killpg(web.pid, signal.SIGTERM)
            try:
                web.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(web.pid, signal.SIGKILL)
        triton.stop()


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not ready after {timeout_s} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (make test installs it)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _download(page, selector: str) -> tuple[str, bytes]:
    with page.expect_download() as info:
        page.click(selector)
    dl = info.value
    return dl.suggested_filename, open(dl.path(), "rb").read()


def test_upload_generate_inspect_download_in_a_real_browser(stack, browser):
    params, url, _ = stack
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.goto(url)
    assert page.locator("#research-notice").is_visible()
    # the served model's classes (its config), shown by their display names (params), sent as codes
    assert page.locator("#condition option").all_inner_texts() == ["Normal", "Bacterial pneumonia", "Viral pneumonia"]
    assert [o.get_attribute("value") for o in page.locator("#condition option").all()] == list(CLASSES)
    assert "version 1" in page.inner_text(".lead")

    page.set_input_files("#image", str(CHEST_DX))
    page.select_option("#condition", "PNEUMONIA_VIRAL")
    page.fill("#n", "2")
    page.fill("#seed", "7")
    with page.expect_response(lambda r: r.url.endswith("/generate")) as resp:
        page.click("#generate-button")
    assert resp.value.status == 200
    page.wait_for_selector("#fact-seed")

    assert page.inner_text("#fact-condition") == "Viral pneumonia" and page.inner_text("#fact-code") == "PNEUMONIA_VIRAL"
    assert page.inner_text("#fact-seed") == "7"
    assert (page.inner_text("#fact-model"), page.inner_text("#fact-version")) == ("radsynth-generator", "1")
    assert page.inner_text("#fact-alias").startswith("champion")
    images = page.locator(".gallery img.generated")
    assert images.count() == 2
    assert all(page.evaluate("img => img.complete && img.naturalWidth === 16", images.nth(i).element_handle()) for i in range(2))
    # pixel-exact enlargement: a whole-number zoom, drawn nearest-neighbour
    zoom = int(images.nth(0).get_attribute("data-zoom"))
    assert zoom > 1 and page.evaluate("img => img.getBoundingClientRect().width", images.nth(0).element_handle()) == 16 * zoom
    assert page.evaluate("img => getComputedStyle(img).imageRendering", images.nth(0).element_handle()) == "pixelated"
    # the one-seed strip: every condition, the requested one marked
    strip = page.locator("#seed-strip figure")
    assert strip.count() == 3 and page.locator("#seed-strip figure.current figcaption").inner_text() == "Viral pneumonia"
    assert all(page.evaluate("img => img.complete && img.naturalWidth === 16", strip.nth(i).locator("img").element_handle())
               for i in range(3))
    # quality: registry metrics with their meaning, honest gaps, per-image SSIM and confidence
    assert "38.20" in page.inner_text("tr[data-key='fid_domain']") and "4.10" in page.inner_text("tr[data-key='fid_domain']")
    assert "77.0%" in page.inner_text("tr[data-key='cond_acc']")
    inception = page.inner_text("tr[data-key='fid_inception']")
    assert "unavailable" in inception and "InceptionV3 weights file not present" in inception
    for i in range(2):
        assert re.fullmatch(r"-?[01]\.\d{3}", page.inner_text(f"#image-{i} .ssim"))
        assert re.fullmatch(r"\d{1,3}\.\d%", page.inner_text(f"#image-{i} .confidence"))
    assert re.search(r"Reconstruction SSIM -?[01]\.\d{3}: (close|moderate|loose)", page.inner_text("#reconstruction"))
    assert "DICOM, 1024×1024 → 16×16" in page.inner_text("#upload-panel")
    page.screenshot(path=str(ARTIFACTS / "web_result.png"), full_page=True)

    hrefs = [a.get_attribute("href") for a in page.locator("a[download]").all()]
    assert hrefs and all(h.startswith("/download?") for h in hrefs)               # links, not data URIs
    assert len(page.content()) < 60_000                                         # the page does not carry the files
    name, png = _download(page, "#image-0 a[data-kind=png]")
    assert name == "radsynth_radsynth-generator-v1_PNEUMONIA_VIRAL_seed7_00.png"
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (16, 16)
    name, dcm = _download(page, "#image-1 a[data-kind=dicom]")
    ds = pydicom.dcmread(io.BytesIO(dcm))
    assert name.endswith("_01.dcm") and ds.ConversionType == "SYN" and ds.PatientName == "SYNTHETIC^RADSYNTH"
    assert (ds.Rows, ds.Columns) == (16, 16)
    np.testing.assert_array_equal(ds.pixel_array, np.asarray(Image.open(io.BytesIO(_download(page, "#image-1 a[data-kind=png]")[1]))))
    name, blob = _download(page, "#download-zip")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert sorted(n.rsplit(".", 1)[1] for n in zf.namelist()) == ["dcm", "dcm", "json", "png", "png"]

    # regenerate keeps the upload (reconstruction shown) with a new seed; the permalink reproduces by seed
    page.click("#regenerate")
    page.wait_for_selector("#fact-seed")
    assert page.inner_text("#fact-seed") != "7" and page.locator("#reconstruction").is_visible()
    link = page.input_value("#permalink")
    page.goto(link)
    assert page.locator("#permalink-note").is_visible()

    # the audit log holds one line per generation or download and nothing else
    lines = [json.loads(x) for x in open(params.web.audit_log)]
    assert [x.get("source", x["event"]) for x in lines] == ["upload", "download", "download", "download", "download",
                                                             "regenerate", "permalink"]
    assert all(x["version"] == "1" and x["model"] == "radsynth-generator" for x in lines)
    assert all(x["upload"] for x in lines[1:5])                                  # the downloads came from the upload's latent

    # the model card of the served version, from the real registry (written by `radsynth register`)
    page.click("#model-card-link")
    page.wait_for_selector("#model-card")
    assert page.inner_text("#model-card h1") == "Model card: radsynth-generator v1"
    card = page.inner_text("#model-card")
    assert "Research use only" in card and "Evaluation gate" in card and "Viral pneumonia" in card
    grid = page.locator("#model-card img")
    assert page.evaluate("img => img.complete && img.naturalWidth > 16 * 8", grid.element_handle())
    page.screenshot(path=str(ARTIFACTS / "web_model_card.png"), full_page=True)

    # a bad file: a clear message on the form and a 4xx, nothing generated
    page.goto(url)
    bad = ARTIFACTS / "not_an_image.png"
    bad.write_bytes(b"%PDF-1.7 this is not an image" * 50)
    page.set_input_files("#image", str(bad))
    with page.expect_response(lambda r: r.url.endswith("/generate")) as resp:
        page.click("#generate-button")
    assert resp.value.status == 415
    assert "not a PNG, JPEG or DICOM" in page.inner_text("#form-error")
    assert len(open(params.web.audit_log).readlines()) == 7

    # phone width: nothing overflows sideways
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(link)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.screenshot(path=str(ARTIFACTS / "web_result_phone.png"), full_page=True)


def test_model_not_ready_is_a_503_that_says_so(stack):
    """Triton is up but does not serve the configured generator: 503 naming the model, no traceback."""
    import dataclasses

    from serving.web.app import create_app
    from serving.web.backend import TritonBackend

    params, _, _ = stack
    missing = dataclasses.replace(params, registry=dataclasses.replace(params.registry, model_name="radsynth-generator-missing"))
    client = create_app(missing, backend=TritonBackend(missing)).test_client()
    resp = client.get("/")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "10"
    assert "radsynth-generator-missing" in html and "not ready" in html and 'id="retry"' in html
    assert "Traceback" not in html


def test_triton_down_shows_503_with_retry(stack, browser):
    _, url, triton = stack
    triton.stop()
    page = browser.new_page()
    resp = page.goto(url + "result?condition=NORMAL&seed=1&n=1")
    assert resp.status == 503
    assert "not reachable" in page.inner_text("main")
    assert page.locator("#retry").is_visible()
