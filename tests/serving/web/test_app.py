"""The web app through Flask's test client: pages, every refusal path, privacy, downloads."""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import re
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image

from serving.web.app import InMemoryRequest, create_app
from serving.web.backend import TritonBackend

from tests.memprobe import measure
from tests.radsynth import hostile as H

from .conftest import CHEST_DX, CLASSES, alert
from .hostile_uploads import BAD_UPLOADS, CONTROL_SETUP, GREY, MEMORY_BOUND_PER_PIXEL, PROBE_SETUP, WARNED_UPLOADS, png_bytes


def gallery(html: str) -> list[str]:
    """The data URIs of the generated images (the gallery tiles, in order)."""
    return re.findall(r'<figure class="tile" id="image-\d+">\s*<img src="(data:image/png;base64,[^"]+)"', html)


def links(html: str, kind: str) -> list[str]:
    """The download links of one kind (png | dicom) in gallery order."""
    return [html_lib.unescape(u) for u in re.findall(rf'<a class="button small" href="([^"]+)" download="[^"]+" data-kind="{kind}"', html)]


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def audit_lines(params) -> list[dict]:
    path = params.web.audit_log
    try:
        return [json.loads(line) for line in open(path)]
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------


def test_home_lists_served_conditions_with_labelled_controls_and_notice(client):
    resp = client.get("/")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert re.findall(r'<option value="([^"]+)"', html) == list(CLASSES)         # codes in the form, names for people
    assert re.findall(r'<option value="[^"]+" ?(?:selected)?>([^<]+)</option>', html) == [
        "Normal", "Bacterial pneumonia", "Viral pneumonia"]
    assert 'href="/model-card"' in html
    for control in ("image", "condition", "n", "seed"):
        assert f'<label for="{control}"' in html and f'id="{control}"' in html
    assert "Research use only" in html and "must not be used for diagnosis or treatment" in html
    assert 'name="csrf_token"' in html
    assert "https://" not in html and "//cdn" not in html  # offline: nothing external
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


def test_generate_without_upload_shows_images_facts_metrics_and_audits(client, params, h):
    resp = h.post_generate(client, condition="PNEUMONIA_VIRAL", n=3, seed=11)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert len(gallery(html)) == 3
    assert re.search(r'id="fact-condition">Viral pneumonia<', html) and re.search(r'id="fact-code"><code>PNEUMONIA_VIRAL<', html)
    assert "3 synthetic images of <span class=\"cond\">Viral pneumonia</span>" in html
    assert "PNEUMONIA_VIRAL" not in html.split('<section class="card" id="metrics">')[1]   # people read names, not codes
    assert re.search(r'id="fact-seed">11<', html)
    assert re.search(r'id="fact-version">2<', html) and re.search(r'id="fact-alias">champion', html)
    # metrics: recorded values formatted, the absent ones honestly unavailable with their reason
    assert re.search(r'data-key="fid_domain">.*?41\.50.*?3\.25', html, re.S)
    assert re.search(r'data-key="fid_inception">.*?unavailable.*?InceptionV3 weights file not present', html, re.S)
    assert re.search(r'data-key="ssim_nearest">.*?unavailable.*?not recorded', html, re.S)
    assert "unavailable (no upload)" in html
    assert html.count("Research use only") == 1
    [line] = audit_lines(params)
    assert set(line) == {"time", "event", "model", "version", "alias", "condition", "seed", "n", "source", "upload"}
    assert (line["condition"], line["seed"], line["n"], line["version"], line["upload"]) == ("PNEUMONIA_VIRAL", 11, 3, "2", False)


def test_same_seed_same_images_and_permalink_reproduces_them(client, h):
    first = h.post_generate(client, seed=5, n=2).get_data(as_text=True)
    link = html_lib.unescape(re.search(r'id="permalink" type="text" readonly value="([^"]+)"', first).group(1))
    assert link.endswith("/result?condition=NORMAL&seed=5&n=2")
    again = client.get(link.replace("http://localhost", ""))
    assert again.status_code == 200
    pngs = gallery
    assert pngs(first) == pngs(again.get_data(as_text=True))
    assert "Opened from a permalink" in again.get_data(as_text=True)
    other = h.post_generate(client, seed=6, n=2).get_data(as_text=True)
    assert pngs(other) != pngs(first)


def test_dicom_upload_seeds_generation_and_is_the_ssim_reference(client, backend, h):
    resp = h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm", n=2, seed=3)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert backend.calls[:2] == ["encode", "generate"]
    assert "Preprocessed exactly as training data (DICOM, 1024×1024 → 16×16)" in html
    ssims = [float(v) for v in re.findall(r'<dd class="ssim">([-0-9.]+)</dd>', html)]
    assert len(ssims) == 2 and all(-1 <= s <= 1 for s in ssims)
    recon = float(re.search(r"Reconstruction SSIM <strong>([-0-9.]+)</strong>", html).group(1))
    assert -1 <= recon <= 1
    assert "your upload is not part of it" in html  # the permalink says it regenerates without the upload
    # the upload changes the images: same seed without it gives different pixels
    plain = h.post_generate(client, n=2, seed=3).get_data(as_text=True)
    assert gallery(plain) != gallery(html)


def test_upload_preprocessing_matches_training(client, h):
    """The preview is radsynth.imaging's training preprocessing of the same file, pixel for pixel."""
    from radsynth import imaging

    html = h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm").get_data(as_text=True)
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)" class="generated"[^>]* alt="Your upload', html).group(1)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))))
    expected = imaging.prepare(imaging.dicom_to_array(imaging.read_dicom(CHEST_DX.read_bytes())), 16)[0]
    np.testing.assert_array_equal(shown, expected)


def test_regenerate_keeps_upload_with_a_new_seed(client, h):
    html = h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm", seed=3).get_data(as_text=True)
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html.split('id="regenerate-form"')[1].split("</form>")[0]))
    assert set(form) == {"csrf_token", "condition", "n", "reference"}
    resp = client.post("/regenerate", data=form)
    again = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert "Reconstruction SSIM" in again
    assert re.search(r'id="fact-seed">(\d+)<', again).group(1) != "3"
    tampered = dict(form, reference=form["reference"][:-4] + "AAAA")
    bad = client.post("/regenerate", data=tampered)
    assert bad.status_code == 400 and "could not be verified" in bad.get_data(as_text=True)


def test_downloads_are_links_that_regenerate_the_shown_images(client, params, h):
    html = h.post_generate(client, n=2, seed=9).get_data(as_text=True)
    assert "data:application" not in html and 'href="data:' not in html      # no file is inlined as a data URI
    png_links = links(html, "png")
    assert len(png_links) == 2 and png_links[0].startswith("/download?") and "r=" not in png_links[0]
    resp = client.get(png_links[1])
    assert resp.status_code == 200 and resp.mimetype == "image/png" and resp.headers["Cache-Control"] == "no-store"
    assert 'filename=radsynth_radsynth-generator-v2_NORMAL_seed9_01.png' in resp.headers["Content-Disposition"]
    img = Image.open(io.BytesIO(resp.data))
    assert img.format == "PNG" and img.size == (16, 16) and img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), decode(gallery(html)[1]))   # the file is the image shown
    dcm = client.get(links(html, "dicom")[0])
    ds = pydicom.dcmread(io.BytesIO(dcm.data))
    assert dcm.mimetype == "application/dicom" and ds.InstanceNumber == 1 and ds.BodyPartExamined == "CHEST"
    np.testing.assert_array_equal(ds.pixel_array, decode(gallery(html)[0]))
    zip_link = html_lib.unescape(re.search(r'id="download-zip" href="([^"]+)"', html).group(1))
    with zipfile.ZipFile(io.BytesIO(client.get(zip_link).data)) as zf:
        names = zf.namelist()
        prov = json.loads(zf.read("provenance.json"))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(zf.read(names[0])))), decode(gallery(html)[0]))
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["dcm", "dcm", "json", "png", "png"]
    assert prov["synthetic"] is True and prov["seed"] == 9 and prov["version"] == "2"
    assert [x["event"] for x in audit_lines(params)] == ["generate", "download", "download", "download"]
    # a link made for another served version, or out of range, is refused with a page
    stale = client.get(png_links[0].replace("v=2", "v=1"))
    assert stale.status_code == 409 and "model changed" in stale.get_data(as_text=True)
    assert client.get(png_links[0].replace("i=0", "i=5")).status_code == 400
    assert client.get("/download?condition=NORMAL&seed=1&n=1&v=2&format=exe&i=0").status_code == 400


def test_upload_seeded_download_links_carry_the_latent_encrypted_and_expire(client, backend, params, h, monkeypatch):
    html = h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm", n=2, seed=3).get_data(as_text=True)
    link = links(html, "png")[1]
    token = re.search(r"[?&]r=([^&]+)", link).group(1)
    import urllib.parse

    raw = urllib.parse.unquote(token)
    assert len(raw) < 1000 and "pixels" not in raw                            # a short opaque token, not the image
    with pytest.raises(Exception):
        json.loads(base64.urlsafe_b64decode(raw + "=="))                      # not readable without the key
    got = np.asarray(Image.open(io.BytesIO(client.get(link).data)))
    np.testing.assert_array_equal(got, decode(gallery(html)[1]))              # the upload-seeded image, regenerated
    plain = client.get(re.sub(r"&r=[^&]+", "", link))
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(plain.data))), got)   # without the latent it differs
    tampered = client.get(link.replace(token, token[:-6] + "AAAAAA"))
    assert tampered.status_code == 410 and "expired" in tampered.get_data(as_text=True)
    import time as time_mod

    later = time_mod.time() + params.web.download_ttl_s + 5
    monkeypatch.setattr(time_mod, "time", lambda: later)                      # Fernet checks the token's age
    assert client.get(link).status_code == 410


def test_one_seed_strip_and_pixel_exact_enlargement(client, params, h):
    html = h.post_generate(client, condition="PNEUMONIA_BACTERIAL", n=2, seed=21).get_data(as_text=True)
    strip = html.split('id="seed-strip"')[1].split("</section>")[0]
    tiles = re.findall(r'<figure class="(current|)" data-condition="([^"]+)">\s*<img src="(data:image/png;base64,[^"]+)"', strip)
    assert [t[1] for t in tiles] == list(CLASSES) and [t[0] for t in tiles] == ["", "current", ""]
    assert [c for c in ("Normal", "Bacterial pneumonia", "Viral pneumonia") if f"<figcaption>{c}</figcaption>" in strip] == [
        "Normal", "Bacterial pneumonia", "Viral pneumonia"]
    shown = [decode(t[2]) for t in tiles]
    np.testing.assert_array_equal(shown[1], decode(gallery(html)[0]))        # the requested condition's tile is image 1
    assert not np.array_equal(shown[0], shown[1])                             # the condition alone changes the image
    other = h.post_generate(client, condition="NORMAL", n=1, seed=21).get_data(as_text=True)
    np.testing.assert_array_equal(decode(gallery(other)[0]), shown[0])        # the same latent, the other condition
    # 16 px images enlarged by a whole number, with nearest-neighbour sampling in the stylesheet
    z = int(re.search(r'data-zoom="(\d+)"', html).group(1))
    assert z == 224 // 16 and f'width="{16 * z}" height="{16 * z}" data-zoom="{z}"' in html
    css = client.get("/static/style.css").get_data(as_text=True)
    assert re.search(r"img\.generated[^{]*\{[^}]*image-rendering: pixelated", css)


def test_model_card_page_renders_the_served_versions_card_safely(params, backend):
    from .conftest import StaticCards

    markdown = ("# Model card: radsynth-generator v2\n\n> **Research use only.** Synthetic.\n\n| check | result |\n|---|---|\n"
                "| cond_acc/NORMAL | pass |\n\n![grid](model_card_grid.png)\n\n<script>alert(1)</script>\n")
    grid = png_bytes(np.zeros((48, 128), np.uint8))
    client = create_app(params, backend=backend, cards=StaticCards({("radsynth-generator", "2"): (markdown, grid)})).test_client()
    page = client.get("/model-card")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "<h1>Model card: radsynth-generator v2</h1>" in html
    assert "<table>" in html and "<td>cond_acc/NORMAL</td>" in html and "<blockquote>" in html
    assert '<img src="/model-card/grid.png" class="card-grid" alt="grid"' in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html   # raw HTML in a card is shown, never run
    assert client.get("/model-card/grid.png").data == grid
    missing = create_app(params, backend=backend, cards=StaticCards({})).test_client()
    html = missing.get("/model-card").get_data(as_text=True)
    assert 'id="model-card-missing"' in html and "registered without a model card" in html
    assert missing.get("/model-card/grid.png").status_code == 404


# --------------------------------------------------------------------------------------
# Refusals: clear message, 4xx, nothing generated, nothing stored, nothing audited
# --------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def probed():
    """Every bad and warned upload posted in a child process, each with its peak memory growth."""
    return measure(PROBE_SETUP, [*BAD_UPLOADS, *WARNED_UPLOADS])


def _no_identifier(*texts: str) -> None:
    for value in H.identifiers():
        for text in texts:
            assert value not in text, f"identifier {value!r} echoed"


@pytest.mark.parametrize("case", list(BAD_UPLOADS), ids=list(BAD_UPLOADS))
def test_bad_upload_is_refused_clearly_cheaply_and_nothing_is_kept(probed, params, case):
    """Status, message, nothing generated/stored/audited, no identifier anywhere, bounded memory."""
    _, _, status, words = BAD_UPLOADS[case]
    result = probed[case]
    assert result["error"] is None, result["error"]
    got = result["value"]
    assert got["status"] == status, alert(got["html"])
    message = html_lib.unescape(alert(got["html"]))
    assert words.lower() in message.lower(), message
    assert "Traceback" not in got["html"]
    assert got["calls"] == [] and got["audit"] == "" and got["stored"] is False
    _no_identifier(got["html"], got["log"], result["stderr"])
    bound = MEMORY_BOUND_PER_PIXEL * 2048 * 2048
    assert result["growth"] < bound, f"peak growth {result['growth'] / 2**20:.1f} MiB >= {bound / 2**20:.0f} MiB"


@pytest.mark.parametrize("case", list(WARNED_UPLOADS), ids=list(WARNED_UPLOADS))
def test_off_domain_or_burned_in_dicom_is_accepted_with_a_visible_warning(probed, case):
    _, _, words = WARNED_UPLOADS[case]
    result = probed[case]
    got = result["value"]
    assert got["status"] == 200
    warning = re.search(r'<p class="warning" id="upload-warning-0">(.*?)</p>', got["html"], re.S)
    assert warning and words in html_lib.unescape(warning.group(1)), got["html"][:2000]
    assert "reads your upload as" not in got["html"]  # the classifier's reading is not shown beside the warning
    _no_identifier(got["html"], got["log"], result["stderr"])


def test_the_memory_probe_sees_codec_allocations():
    """Control: decoding the J2K lie WITHOUT the guard (pydicom alone) costs far more than the bound."""
    result = measure(CONTROL_SETUP, ["unguarded"])["unguarded"]
    assert result["growth"] > MEMORY_BOUND_PER_PIXEL * 2048 * 2048, result


def test_off_domain_upload_is_refused_when_params_say_so(params, backend, h):
    from radsynth.config import load_params

    strict = load_params(params_path(), profile="tiny", overrides={**overrides_of(params), "web.off_domain": "refuse"})
    client = create_app(strict, backend=backend).test_client()
    resp = h.post_generate(client, H.brain_mr(), "brain.dcm")
    message = h.alert(resp.get_data(as_text=True))
    assert resp.status_code == 422 and "modality MR and body part BRAIN" in message and "refused" in message
    assert backend.calls == [] and audit_lines(strict) == []
    assert h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm").status_code == 200  # a chest DX still passes


def test_deflated_dicom_within_the_cap_is_accepted(client, h):
    resp = h.post_generate(client, H.deflated(H.dataset(64, 64)), "deflated.dcm")
    assert resp.status_code == 200 and "DICOM, 64×64" in resp.get_data(as_text=True)


def test_concurrent_uploads_print_no_header_value(tmp_path):
    """pydicom's warning for a name in Number of Frames is silenced in every thread of a child, where
    nothing resets warnings between calls (gunicorn's gthread workers)."""
    code = """
import threading
from serving.web.uploads import UploadError, read_upload
from tests.radsynth import hostile as H
data = H.frames_is_a_name()
errors = []
def go():
    for _ in range(20):
        try:
            read_upload(data, max_bytes=2**22, max_pixels=2**22, resolution=16)
        except UploadError as exc:
            errors.append(str(exc))
threads = [threading.Thread(target=go) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), sorted(set(errors)))
"""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("160 ") and "NumberOfFrames is not a whole number" in proc.stdout
    assert H.NAME_IN_A_NUMBER not in proc.stdout + proc.stderr and "DOE" not in proc.stderr, proc.stderr


def test_content_not_extension_decides(client, h):
    """A real PNG named .dcm is accepted; the extension is never trusted."""
    resp = h.post_generate(client, png_bytes(GREY), "looks_like.dcm")
    assert resp.status_code == 200
    assert "Preprocessed exactly as training data (PNG, 96×80" in resp.get_data(as_text=True)


def test_grey_jpeg_and_grey_rgb_png_are_accepted(client, h):
    buf = io.BytesIO()
    Image.fromarray(GREY).save(buf, format="JPEG", quality=90)
    assert h.post_generate(client, buf.getvalue(), "x.jpg").status_code == 200
    assert h.post_generate(client, png_bytes(np.stack([GREY] * 3, -1)), "x.png").status_code == 200


def test_file_over_the_size_cap_is_refused(client, params, h):
    over = params.web.max_upload_bytes + 1000  # below Flask's body cap: our own check answers
    resp = h.post_generate(client, b"\x89PNG\r\n\x1a\n" + b"\0" * over, "big.png")
    assert resp.status_code == 413 and "the limit is 4 MiB" in h.alert(resp.get_data(as_text=True))
    huge = params.web.max_upload_bytes + (2 << 20)  # above MAX_CONTENT_LENGTH: Flask refuses the body
    resp = h.post_generate(client, b"\0" * huge, "huge.png")
    assert resp.status_code == 413 and "larger than the 4 MiB limit" in h.alert(resp.get_data(as_text=True))
    assert audit_lines(params) == []


def test_pixel_cap_comes_from_params(params, backend, h):
    from radsynth.config import load_params

    small = load_params(params_path(), profile="tiny", overrides={**overrides_of(params), "web.max_pixels": 1000})
    client = create_app(small, backend=backend).test_client()
    resp = h.post_generate(client, png_bytes(GREY), "x.png")  # 96 x 80 = 7680 pixels
    assert resp.status_code == 413 and "megapixels" in h.alert(resp.get_data(as_text=True))


@pytest.mark.parametrize("fields, words", [
    ({"condition": "FRACTURE"}, "Unknown condition"),
    ({"n": "0"}, "between 1 and 4"),
    ({"n": "5"}, "between 1 and 4"),
    ({"n": "two"}, "whole number"),
    ({"seed": "-1"}, "between 0 and 2^63"),
    ({"seed": "1e3"}, "whole number"),
], ids=["condition", "n0", "n-too-many", "n-text", "seed-negative", "seed-float"])
def test_bad_form_values_are_400_with_a_message(client, backend, h, fields, words):
    resp = h.post_generate(client, **fields)
    assert resp.status_code == 400
    assert words in h.alert(resp.get_data(as_text=True))
    assert backend.calls == []


def test_csrf_is_required_on_every_post(client, backend, params):
    client.get("/")
    for form in ({"condition": "NORMAL", "n": "1"}, {"condition": "NORMAL", "n": "1", "csrf_token": "forged"}):
        resp = client.post("/generate", data=form)
        assert resp.status_code == 400 and "expired or did not come from this site" in resp.get_data(as_text=True)
        resp = client.post("/regenerate", data=form)
        assert resp.status_code == 400
    # a token from another session does not work either
    other = create_app(params, backend=backend).test_client()
    page = other.get("/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post("/generate", data={"condition": "NORMAL", "n": "1", "csrf_token": token}).status_code == 400
    assert backend.calls == []


def test_permalink_needs_a_seed(client):
    resp = client.get("/result?condition=NORMAL&n=1")
    assert resp.status_code == 400 and "needs its seed" in resp.get_data(as_text=True)


def test_triton_down_gives_a_503_page_with_retry(params):
    import socket

    pytest.importorskip("serving.client", reason="serving/client.py (serving helper) not merged yet")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from radsynth.config import load_params

    down = load_params(params_path(), profile="tiny", overrides={**overrides_of(params), "web.triton_url": f"127.0.0.1:{port}",
                                                                   "web.triton_timeout_s": 2.0})
    client = create_app(down, backend=TritonBackend(down)).test_client()
    for resp in (client.get("/"), client.get("/result?condition=NORMAL&seed=1&n=1")):
        html = resp.get_data(as_text=True)
        assert resp.status_code == 503
        assert "not reachable" in html and f"127.0.0.1:{port}" in html
        assert 'id="retry"' in html and resp.headers["Retry-After"] == "10"
    assert client.get("/healthz").status_code == 503
    assert audit_lines(down) == []


def test_unknown_route_and_internal_errors_are_pages_not_tracebacks(client, backend, h):
    resp = client.get("/nope")
    assert resp.status_code == 404 and "<html" in resp.get_data(as_text=True)

    def broken(*a, **k):
        raise RuntimeError("secret internal detail")

    backend.generate = broken
    resp = h.post_generate(client)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 500 and "secret internal detail" not in html and "Traceback" not in html


# --------------------------------------------------------------------------------------
# Privacy
# --------------------------------------------------------------------------------------


def test_uploads_stay_in_memory(app):
    """Werkzeug spools big multipart files to a temp file; ours never does."""
    big = b"\x89PNG" + b"\0" * (2 << 20)
    with app.test_request_context("/generate", method="POST", data={"image": (io.BytesIO(big), "x.png")},
                                  content_type="multipart/form-data"):
        from flask import request

        assert isinstance(request, InMemoryRequest)
        assert isinstance(request.files["image"].stream, io.BytesIO)


def test_nothing_identifying_reaches_page_or_log(client, params, h):
    ds = pydicom.dcmread(CHEST_DX)
    identifiers = [str(v) for v in (ds.get("PatientName"), ds.get("PatientID"), ds.get("StudyInstanceUID"),
                                    ds.get("SOPInstanceUID"), ds.get("InstitutionName")) if v]
    assert identifiers
    html = h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm").get_data(as_text=True)
    log = open(params.web.audit_log).read()
    for value in identifiers:
        assert value not in html and value not in log
    assert not __import__("os").path.exists(params.web.upload_dir)


def test_store_uploads_keeps_only_the_preprocessed_image(params, backend, h, tmp_path):
    from radsynth.config import load_params

    keep = load_params(params_path(), profile="tiny", overrides={**overrides_of(params), "web.store_uploads": True})
    client = create_app(keep, backend=backend).test_client()
    assert h.post_generate(client, CHEST_DX.read_bytes(), "chest.dcm").status_code == 200
    files = list((tmp_path / "uploads").iterdir())
    assert len(files) == 1 and files[0].suffix == ".png"
    assert Image.open(files[0]).size == (16, 16)  # the model's input, not the DICOM


def test_two_apps_in_one_process_keep_their_own_state(params, backend, h, tmp_path):
    """Each app's limits, audit log and keys live on that app (WebState), not in module state."""
    from radsynth.config import load_params

    other = load_params(params_path(), profile="tiny", overrides={
        **overrides_of(params), "web.max_images": 2, "web.audit_log": str(tmp_path / "other" / "audit.jsonl")})
    first, second = create_app(params, backend=backend), create_app(other, backend=backend)
    a, b = first.test_client(), second.test_client()
    assert h.post_generate(b, n=3).status_code == 400          # over the second app's max_images (2)
    assert h.post_generate(a, n=3).status_code == 200          # within the first's (4)
    assert len(audit_lines(params)) == 1 and audit_lines(other) == []
    assert first.extensions["radsynth"].signer is not second.extensions["radsynth"].signer


# helpers to rebuild params with one more override
def params_path():
    from .conftest import ROOT

    return ROOT / "params.yaml"


def overrides_of(params) -> dict:
    w = params.web
    return {"web.audit_log": w.audit_log, "web.upload_dir": w.upload_dir, "web.max_upload_bytes": w.max_upload_bytes,
            "web.max_pixels": w.max_pixels, "web.max_images": w.max_images}
