"""The reader-study page through the real app (``create_app`` + the study blueprint), the real
answer store and a study built by ``create_study`` from a real tiny generator in process.

What a reader can and cannot reach: only their own current image, by position; no answer key,
no other reader's anything; a wrong token is the app's ordinary 404.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from radsynth.config import load_params
from serving.study import close_study, create_study, reissue_token
from serving.study_store import CANNOT_TELL, TokenIndex, hash_token, load_study
from tests.serving.study_helpers import TorchSource, make_dataset, tiny_model

from .conftest import ROOT


@pytest.fixture
def study_env(tmp_path):
    """``(params, study, tokens, app client)``: a 3-reader, 12-image study and the web app over it."""
    from serving.web.app import create_app
    from tests.serving.web.conftest import TorchBackend

    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={
        "paths.artifacts": str(tmp_path / "artifacts"), "web.audit_log": str(tmp_path / "audit.jsonl")})
    make_dataset(tmp_path / "artifacts" / "dataset")
    G, ref = tiny_model(params)
    study, tokens = create_study(params, ref, TorchSource(G), readers=3, images=12, seed=2**40 + 21, title="Chest study A")
    app = create_app(params, backend=TorchBackend(params))
    app.config["TESTING"] = True
    return params, study, tokens, app.test_client()


def answer(client, token, position, call="real", confidence="3", condition="NORMAL", **extra):
    data = {"position": str(position), "call": call, "confidence": str(confidence), "condition": condition, **extra}
    return client.post(f"/study/{token}", data=data)


def test_wrong_tokens_are_the_apps_plain_404(study_env):
    params, study, tokens, client = study_env
    unknown = client.get("/no-such-page")
    assert unknown.status_code == 404
    for bad in ("A" * 32, tokens[0][:-1] + ("A" if tokens[0][-1] != "A" else "B"), hash_token(tokens[0]),
                study.id, "short", tokens[0] + "x", "../" + tokens[0]):
        for path in (f"/study/{bad}", f"/study/{bad}/image/0"):
            resp = client.get(path)
            assert resp.status_code == 404, (bad, path)
            assert resp.get_data() == unknown.get_data()          # indistinguishable from any unknown URL
        assert client.post(f"/study/{bad}", data={"position": "0"}).status_code == 404
    assert study.answers().all() == []


def test_intro_then_one_image_with_two_questions_and_progress(study_env):
    _, study, tokens, client = study_env
    intro = client.get(f"/study/{tokens[0]}")
    html = intro.get_data(as_text=True)
    assert intro.status_code == 200 and 'id="begin"' in html and "Chest study A" in html and "12 chest radiographs" in html
    page = client.get(f"/study/{tokens[0]}?begin=1")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert re.search(r'<img id="study-image" src="/study/' + re.escape(tokens[0]) + r'/image/0" width="512" height="512"', html)
    assert "Image 1 of 12" in html and 'name="call" value="real"' in html and 'name="call" value="synthetic"' in html
    assert [int(v) for v in re.findall(r'name="confidence" value="(\d)"', html)] == [1, 2, 3, 4, 5]
    assert re.findall(r'name="condition" value="([A-Z_]+)"', html) == list(study.classes) + [CANNOT_TELL]
    assert 'type="file"' not in html and "enctype" not in html          # no upload path
    assert "real, de-identified radiographs and synthetic ones" in html
    assert "Images are synthetic" not in html                            # the generator page's notice would mislead


def test_page_reveals_no_answer_key_and_nothing_of_other_readers(study_env, tmp_path):
    _, study, tokens, client = study_env
    manifest = study.manifest
    secrets_on_disk = {study.id, str(study.root), *tokens[1:], *study.token_hashes,
                       *(str(s) for s in manifest["seeds"]["synthetic"]),
                       str(manifest["seeds"]["study"]), str(manifest["seeds"]["order"]), str(manifest["seeds"]["real"]),
                       *(item["sha256"] for item in manifest["items"])}
    bodies = []
    for path in (f"/study/{tokens[0]}", f"/study/{tokens[0]}?begin=1", "/static/study.js", "/static/study.css"):
        resp = client.get(path)
        assert resp.status_code == 200
        bodies.append(resp.get_data(as_text=True))
    answer(client, tokens[0], 0)
    bodies.append(client.get(f"/study/{tokens[0]}?begin=1").get_data(as_text=True))
    text = "\n".join(bodies)
    for secret in secrets_on_disk:
        assert secret not in text, secret
    for key_word in ("dataset_index", '"kind"', "manifest", "sha256", "seed"):
        assert key_word not in text
    # the answer key is not under the web app's static files, and the static route cannot climb out
    static = Path(client.application.static_folder).resolve()
    assert static not in study.root.resolve().parents
    for path in ("/static/../../../" + str(study.root / "manifest.json"), "/static/..%2f..%2fmanifest.json",
                 f"/static/{study.root.name}/manifest.json"):
        assert client.get(path).status_code == 404
    # the image is served by the reader's position, never by item, and only the current one
    order = study.order(1)
    resp = client.get(f"/study/{tokens[0]}/image/1")
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    assert resp.get_data() == study.image_path(order[1]).read_bytes()
    for position in (0, 2, 11, 12, 999):
        assert client.get(f"/study/{tokens[0]}/image/{position}").status_code == 404
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Referrer-Policy"] == "no-referrer"


def test_every_image_has_the_same_byte_size_and_no_metadata(study_env):
    _, study, _, _ = study_env
    sizes = {study.image_path(i).stat().st_size for i in range(study.num_images)}
    assert len(sizes) == 1
    kinds = {item["kind"] for item in study.manifest["items"]}
    assert kinds == {"real", "synthetic"}
    for i in range(study.num_images):
        data = study.image_path(i).read_bytes()
        chunks, offset = [], 8
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 4], "big")
            chunks.append(data[offset + 4:offset + 8])
            offset += 12 + length
        assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}


def test_answers_are_validated_stored_in_order_and_once(study_env):
    _, study, tokens, client = study_env
    bad = answer(client, tokens[1], 0, call="maybe", confidence="9", condition="FLU")
    html = bad.get_data(as_text=True)
    assert bad.status_code == 400 and 'id="form-error"' in html
    assert "real or synthetic" in html and "how confident" in html and "the condition" in html
    kept = answer(client, tokens[1], 0, call="synthetic", confidence="", condition="COVID")
    assert kept.status_code == 400 and re.search(r'value="synthetic"[^>]*\s+checked', kept.get_data(as_text=True))
    assert study.answers().all() == []

    ok = answer(client, tokens[1], 0, call="synthetic", confidence=4, condition="COVID", elapsed_ms="2150")
    assert ok.status_code == 303 and ok.headers["Location"].endswith(f"/study/{tokens[1]}?begin=1")
    again = answer(client, tokens[1], 0, call="real", confidence=1, condition="NORMAL")   # double submit
    ahead = answer(client, tokens[1], 5)                                                  # not the current position
    assert again.status_code == 303 and ahead.status_code == 303
    rows = study.answers().all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.reader, row.position, row.item, row.call, row.confidence, row.condition, row.elapsed_ms) == (
        2, 0, study.order(2)[0], "synthetic", 4, "COVID", 2150)
    answer(client, tokens[1], 1, elapsed_ms="-5")
    assert study.answers().all()[-1].elapsed_ms is None                                   # nonsense time: not kept
    # nothing about the reader beyond their number: the table's columns
    with sqlite3.connect(study.root / "answers.sqlite") as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(answers)")]
    assert columns == ["reader", "position", "item", "call", "confidence", "condition", "elapsed_ms", "answered_at"]


def test_concurrent_submits_of_one_position_store_exactly_one_answer(study_env):
    _, study, tokens, client = study_env
    app = client.application
    barrier = threading.Barrier(6)
    codes = []

    def submit(i):
        with app.test_client() as c:
            barrier.wait()
            codes.append(answer(c, tokens[2], 0, confidence=1 + i % 5).status_code)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [303] * 6
    assert [(a.reader, a.position) for a in study.answers().all()] == [(3, 0)]


def test_resumable_from_the_same_link_and_finished_page(study_env):
    from serving.web.app import create_app

    params, study, tokens, client = study_env
    for position in range(5):
        answer(client, tokens[0], position)
    fresh = create_app(params, backend=None).test_client()              # another browser, another worker
    html = fresh.get(f"/study/{tokens[0]}").get_data(as_text=True)
    assert "Image 6 of 12" in html and f"/study/{tokens[0]}/image/5" in html
    for position in range(5, 12):
        assert answer(fresh, tokens[0], position).status_code == 303
    done = fresh.get(f"/study/{tokens[0]}")
    assert done.status_code == 200 and 'id="done"' in done.get_data(as_text=True)
    assert fresh.get(f"/study/{tokens[0]}/image/11").status_code == 404
    assert answer(fresh, tokens[0], 12).status_code == 303 and len(study.answers().all()) == 12
    assert "Image 1 of 12" in fresh.get(f"/study/{tokens[1]}?begin=1").get_data(as_text=True)   # readers are separate


def test_closed_study_keeps_answers_and_takes_no_more(study_env):
    _, study, tokens, client = study_env
    answer(client, tokens[0], 0)
    close_study(study)
    page = client.get(f"/study/{tokens[0]}")
    assert page.status_code == 410 and 'id="closed"' in page.get_data(as_text=True)
    assert client.get(f"/study/{tokens[0]}/image/1").status_code == 404
    answer(client, tokens[0], 1)
    assert len(study.answers().all()) == 1


def test_token_lookup_compares_every_hash_without_stopping(study_env, monkeypatch):
    _, study, tokens, _ = study_env
    import serving.study_store as store

    calls = []
    real = store.hmac.compare_digest
    monkeypatch.setattr(store.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    index = TokenIndex(study.root.parent)
    for token in (tokens[0], tokens[2], "Z" * 32):
        calls.clear()
        found = index.lookup(token)
        assert len(calls) == study.num_readers                          # the same work whichever matched
        expected = {tokens[0]: 1, tokens[2]: 3}.get(token)
        assert (found is None) if expected is None else (found[0].root, found[1]) == (study.root, expected)


def test_tokens_are_stored_only_hashed_and_reissue_replaces_one(study_env):
    _, study, tokens, client = study_env
    for path in study.root.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(t.encode() in blob for t in tokens), path
    readers = json.loads((study.root / "readers.json").read_text())
    assert readers == {"readers": [{"reader": i + 1, "token_sha256": hash_token(t)} for i, t in enumerate(tokens)]}
    answer(client, tokens[1], 0)
    new = reissue_token(load_study(study.root), 2)
    assert client.get(f"/study/{tokens[1]}").status_code == 404
    html = client.get(f"/study/{new}").get_data(as_text=True)
    assert "Image 2 of 12" in html                                      # their answer is kept
    assert client.get(f"/study/{tokens[0]}").status_code == 200         # the others still work


def test_new_study_is_found_while_the_app_runs(study_env):
    params, study, tokens, client = study_env
    G, ref = tiny_model(params, version=8, seed=1)
    second, more = create_study(params, ref, TorchSource(G), readers=1, images=6, seed=3)
    assert client.get(f"/study/{more[0]}").status_code == 200
    assert client.get(f"/study/{tokens[0]}").status_code == 200
    assert second.root.parent == study.root.parent


def test_report_of_an_empty_and_a_partial_study_says_so(study_env):
    from serving.study import report_study
    from serving.study_report import card_section, compute_report, format_markdown

    params, study, tokens, client = study_env
    empty = compute_report(study, [])
    assert empty["pooled"]["accuracy"]["value"] is None and empty["pooled"]["auc"]["value"] is None
    assert empty["interpretation"][-1] == "No answers yet." and "n/a" in format_markdown(empty)
    for position in range(4):
        answer(client, tokens[0], position)
    report = report_study(params, study, log_mlflow=False)
    assert report["mlflow"] is None and report["completeness"]["answers"] == 4
    assert report["interpretation"][0].startswith("Incomplete: 4 of 36 answers")
    assert report["readers"][0]["answers"] == 4 and not report["readers"][0]["complete"]
    assert report["inter_reader"]["fleiss_kappa_call"] is None            # no image was read by all three yet
    md = (study.root / "report" / "report.md").read_text()
    assert "1 (incomplete)" in md and "not a clinical validation" in md
    assert card_section(report).startswith("## Reader study")
    import dataclasses

    bad = dataclasses.replace(params, study=dataclasses.replace(params.study, ci_method="wald"))
    from serving.study_store import StudyError

    with pytest.raises(StudyError, match="study.ci_method"):
        report_study(bad, study, log_mlflow=False)


def test_card_section_goes_into_a_model_card_once_and_only_for_its_version(study_env):
    from serving.study import card_section_for, report_study
    from serving.study_report import CARD_BEGIN, card_section, with_card_section

    params, study, tokens, client = study_env
    assert card_section_for(params, study.model_name, study.model_version) is None     # nothing reported yet
    report = report_study(params, study, log_mlflow=False)
    section = card_section_for(params, study.model_name, study.model_version)
    assert section == card_section(report)
    assert card_section_for(params, study.model_name, study.model_version + 1) is None
    assert card_section_for(params, "other-model", study.model_version) is None
    card = "# Model card\n\nIntended use: research.\n"
    once = with_card_section(card, section)
    twice = with_card_section(once + "\n## Limits\n\nMany.\n", section.replace("Reader study", "Reader study (updated)"))
    assert once.startswith(card.rstrip()) and once.count(CARD_BEGIN) == 1
    assert twice.count(CARD_BEGIN) == 1 and "(updated)" in twice and "## Limits" in twice and "Intended use" in twice
    assert with_card_section(None, section).startswith(CARD_BEGIN)
