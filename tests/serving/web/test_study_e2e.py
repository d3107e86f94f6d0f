"""The reader-study page in a real browser: headless Chromium (Debian's, driven by Playwright)
-> gunicorn running ``radsynth web`` (2 workers) -> a study made by ``create_study``.

No Triton runs: a study's images are rendered when it is created, so the page works while the
image server is down. The reader answers with the keyboard, zooms, reloads and resumes; every
response the browser receives is checked for the answer key and other readers' tokens.
Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import re

import pytest

from radsynth.config import load_params
from serving.study import create_study
from tests.serving.study_helpers import TorchSource, make_dataset, tiny_model

from .conftest import ARTIFACTS, ROOT
from .stack import free_port, web_server


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(base URL, study, tokens): `radsynth web` over one 3-reader, 12-image study."""
    tmp = tmp_path_factory.mktemp("study-e2e")
    sets = {"paths.artifacts": str(tmp / "artifacts"), "web.audit_log": str(tmp / "audit.jsonl"),
            "web.triton_url": f"127.0.0.1:{free_port()}"}          # nothing listens there
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides=sets)
    make_dataset(tmp / "artifacts" / "dataset")
    G, ref = tiny_model(params)
    study, tokens = create_study(params, ref, TorchSource(G), readers=3, images=12, seed=2**41 + 5, title="Pilot")
    with web_server(sets, "study-e2e", tmp / "web.log", workers=2, ready="static/study.css") as web:
        yield web.url, study, tokens


def _pixel_exact(page) -> tuple[int, float]:
    """(scale, shown width in device pixels / natural width) of the study image."""
    return tuple(page.evaluate("""() => {
        const img = document.getElementById('study-image');
        const k = Number(img.dataset.scale);
        return [k, img.getBoundingClientRect().width * window.devicePixelRatio / img.naturalWidth];
    }"""))


def test_a_reader_answers_with_the_keyboard_zooms_and_resumes(site, browser):
    url, study, tokens = site
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    secrets = {study.id, *tokens[1:], *study.token_hashes, *(i["sha256"] for i in study.manifest["items"])}
    bodies: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1.25)

    def keep(response) -> None:
        if not 300 <= response.status < 400 and "image/png" not in response.headers.get("content-type", ""):
            bodies.append(response.text())

    page.on("response", keep)

    page.goto(url + f"study/{tokens[0]}")
    assert page.locator("#intro").is_visible() and "Pilot" in page.inner_text("h1")
    page.keyboard.press("Enter")                                     # Begin
    page.wait_for_selector("#study-image")
    assert page.inner_text("#progress-text") == "Image 1 of 12"
    page.wait_for_function("document.getElementById('study-image').complete")
    assert page.evaluate("getComputedStyle(document.getElementById('study-image')).imageRendering") == "pixelated"
    k, ratio = _pixel_exact(page)
    assert k >= 2 and ratio == pytest.approx(k, abs=1e-3)            # each image pixel = k x k device pixels, k whole (layout rounds to 1/64 px)
    page.keyboard.press("+")
    assert _pixel_exact(page) == (k + 1, pytest.approx(k + 1, abs=1e-3)) and "\u00d7" + str(k + 1) in page.inner_text("#zoom-label")
    page.keyboard.press("0")
    assert _pixel_exact(page)[0] == k
    page.screenshot(path=str(ARTIFACTS / "study_item.png"))

    assert page.is_disabled("#submit")                               # nothing chosen yet
    page.keyboard.press("Enter")
    assert page.inner_text("#progress-text") == "Image 1 of 12"      # incomplete: not sent
    keys = [("s", "4", "b"), ("r", "2", "a"), ("s", "5", "x")]
    for position, (call, confidence, condition) in enumerate(keys):
        page.wait_for_function("document.getElementById('study-image').complete")
        for key in (call, confidence, condition):
            page.keyboard.press(key)
        assert page.is_enabled("#submit")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.inner_text("#progress-text") == f"Image {position + 2} of 12"

    rows = study.answers().all()
    order = study.order(1)
    expected = [("synthetic", 4, study.classes[1]), ("real", 2, study.classes[0]), ("synthetic", 5, "CANNOT_TELL")]
    assert [(a.call, a.confidence, a.condition) for a in rows] == expected
    assert [a.item for a in rows] == order[:3] and all(a.reader == 1 and a.elapsed_ms is not None for a in rows)

    page.reload()                                                    # resumable: the same link continues
    assert page.inner_text("#progress-text") == "Image 4 of 12"
    other = browser.new_page()
    other.goto(url + f"study/{tokens[0]}")                           # another browser: the same place
    assert other.inner_text("#progress-text") == "Image 4 of 12"

    for body in bodies:
        for secret in secrets:
            assert secret not in body
        assert "dataset_index" not in body and '"kind"' not in body
    wrong = other.goto(url + "study/" + "A" * 32)
    assert wrong.status == 404 and "Not Found" in other.inner_text("main")

    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(url + f"study/{tokens[2]}?begin=1")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert re.fullmatch(r"\d+", phone.evaluate("document.getElementById('study-image').dataset.scale"))
    phone.screenshot(path=str(ARTIFACTS / "study_item_phone.png"), full_page=True)


def test_the_page_works_without_javascript(site, browser):
    url, study, tokens = site
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(url + f"study/{tokens[1]}?begin=1")
    size = page.evaluate("[document.getElementById('study-image').width, document.getElementById('study-image').naturalWidth]")
    assert size[0] % size[1] == 0                                    # a whole-number enlargement from the markup
    page.check("input[name=call][value=real]")
    page.check("input[name=confidence][value='3']")
    page.check(f"input[name=condition][value={study.classes[2]}]")
    with page.expect_navigation():
        page.click("#submit")
    assert page.inner_text("#progress-text") == "Image 2 of 12"
    rows = [a for a in study.answers().all() if a.reader == 2]
    assert [(a.call, a.confidence, a.condition, a.elapsed_ms) for a in rows] == [("real", 3, study.classes[2], None)]
    context.close()
