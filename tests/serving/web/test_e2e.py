"""End to end in a real browser: Chromium (Debian's, driven by Playwright) -> gunicorn running
``radsynth web`` -> a real tritonserver serving generator, encoder and domain classifier,
with the model's facts from a real MLflow registry.

The models are tiny and untrained (the test checks the product's plumbing, not image quality),
but every piece is the real one: ``components.export`` exports the generator, ``radsynth
encoder`` trains/exports/registers the encoder, ``components.register`` registers generator
and classifier and ``promote`` moves ``champion``, ``serving.repository`` builds the model
repository from the registry (the encoder from its local ONNX file), ``serving.server``
runs tritonserver (the stack is started by ``tests/serving/web/stack.py``). Only the
evaluation's output files are written by hand (numbers chosen there), because a full
evaluation takes minutes.

The result page's screenshot is saved under ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image

from .conftest import ARTIFACTS, CHEST_DX, CLASSES

for _module, _owner in (("serving.client", "serving"), ("serving.repository", "serving"), ("serving.server", "serving"),
                        ("serving.dicom_out", "serving"), ("components.export", "evaluate/export"),
                        ("components.register", "evaluate/export"), ("model.classifier", "evaluate/export")):
    pytest.importorskip(_module, reason=f"{_module} ({_owner} helper) not merged yet")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(params, base URL, triton server): the whole serving stack (tests/serving/web/stack.py), torn down at the end."""
    from .stack import serving_stack

    with serving_stack(tmp_path_factory.mktemp("web-e2e"), "e2e-secret", workers=2, sets={"web.max_images": 4}) as s:
        yield s.params, s.url, s.triton


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
    # the card's text is there before its grid image has loaded: wait for the load, then check it
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.element_handle(), timeout=15000)
    assert page.evaluate("img => img.naturalWidth > 16 * 8", grid.element_handle())
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
