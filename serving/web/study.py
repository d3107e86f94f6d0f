"""The reader-study page: ``/study/<token>``, one image at a time (blueprint ``study``).

What a reader can reach, and nothing else:

- ``GET /study/<token>``: an introduction before the first answer, then the next unanswered
  image with its two questions (real or synthetic with a 1-5 confidence; which condition),
  then a thank-you page. Resuming is the same link: answers are stored one by one.
- ``GET /study/<token>/image/<position>``: the image of the reader's *current* position only
  (earlier and later ones are 404), by position in the reader's own order, never by item.
- ``POST /study/<token>``: one answer for the current position; then a redirect to the next.

A token that is malformed or matches no reader's stored hash (compared in constant time,
``serving/study_store.TokenIndex``) gets the app's ordinary 404 page, the same as any unknown
URL. The pages carry no item number, kind, condition, seed, dataset index or other reader's
anything; images are pre-rendered at ``study create`` (uncompressed PNG, one byte size for all),
so the page needs neither Triton nor the registry. There is no upload path. Every response is
``no-store`` and ``no-referrer`` (the token is in the URL).
"""

from __future__ import annotations

import string

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for

from radsynth.config import Params
from serving.study_store import CALLS, CANNOT_TELL, CONFIDENCE_LEVELS, Study, StudyError, TokenIndex, studies_root

CONFIDENCE_WORDS = {1: "Guess", 2: "Unsure", 3: "Fairly sure", 4: "Sure", 5: "Certain"}
RESERVED_KEYS = set("rsx")                     # real, synthetic, cannot tell
CONDITION_KEYS = [c for c in string.ascii_lowercase if c not in RESERVED_KEYS]


def condition_label(code: str) -> str:
    """A class code as words: ``PNEUMONIA_VIRAL`` -> ``Pneumonia viral`` (other spellings stay as they are)."""
    if not code.isupper():
        return code
    return " ".join(w for w in code.replace("-", "_").split("_") if w).capitalize()


def create_blueprint(params: Params) -> Blueprint:
    """The study pages for the studies under ``study.dir`` (default ``<paths.artifacts>/studies``)."""
    bp = Blueprint("study", __name__, url_prefix="/study")
    index = TokenIndex(studies_root(params))
    display_px = params.study.display_px

    def reader_of(token: str) -> tuple[Study, int]:
        found = index.lookup(token)
        if found is None:
            abort(404)
        return found

    def conditions(study: Study) -> list[dict]:
        if len(study.classes) > len(CONDITION_KEYS):
            keys = [""] * len(study.classes)
        else:
            keys = CONDITION_KEYS[:len(study.classes)]
        return [{"code": c, "label": condition_label(c), "key": k} for c, k in zip(study.classes, keys)]

    def item_page(token: str, study: Study, reader: int, position: int, error: str | None = None,
                  values: dict | None = None, status: int = 200):
        res = study.img_resolution
        scale = max(1, display_px // res)
        return render_template(
            "study_item.html", token=token, study=study, position=position, total=study.num_images,
            image_url=url_for("study.image", token=token, position=position), resolution=res, scale=scale,
            conditions=conditions(study), cannot_tell=CANNOT_TELL, confidence=CONFIDENCE_WORDS,
            error=error, values=values or {},
        ), status

    @bp.after_request
    def private(resp: Response) -> Response:
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Robots-Tag"] = "noindex, nofollow"
        return resp

    @bp.get("/<token>")
    def page(token: str):
        study, reader = reader_of(token)
        done = study.answers().answered(reader)
        total = study.num_images
        if study.closed and done < total:
            return render_template("study_done.html", study=study, done=done, total=total, closed=True), 410
        if done >= total:
            return render_template("study_done.html", study=study, done=done, total=total, closed=False)
        if done == 0 and not request.args.get("begin"):
            return render_template("study_intro.html", study=study, token=token, total=total,
                                   conditions=conditions(study), confidence=CONFIDENCE_WORDS)
        return item_page(token, study, reader, done)

    @bp.get("/<token>/image/<int:position>")
    def image(token: str, position: int):
        study, reader = reader_of(token)
        if study.closed or position != study.answers().answered(reader) or position >= study.num_images:
            abort(404)
        item = study.order(reader)[position]
        data = study.image_path(item).read_bytes()
        return Response(data, mimetype="image/png")

    @bp.post("/<token>")
    def answer(token: str):
        study, reader = reader_of(token)
        store = study.answers()
        done = store.answered(reader)
        if study.closed or done >= study.num_images:
            return redirect(url_for("study.page", token=token), 303)
        form = request.form
        try:
            position = int(form.get("position", ""))
        except ValueError:
            position = -1
        if position != done:  # a second tab or a double submit: show the current image again
            return redirect(url_for("study.page", token=token, begin=1), 303)
        values = {k: form.get(k, "") for k in ("call", "confidence", "condition")}
        missing = []
        call = values["call"]
        if call not in CALLS:
            missing.append("real or synthetic")
        try:
            confidence = int(values["confidence"])
        except ValueError:
            confidence = 0
        if not 1 <= confidence <= CONFIDENCE_LEVELS:
            missing.append("how confident you are (1-5)")
        condition = values["condition"]
        if condition not in study.classes and condition != CANNOT_TELL:
            missing.append("the condition")
        if missing:
            return item_page(token, study, reader, done, error="Please answer: " + ", ".join(missing) + ".",
                             values=values, status=400)
        try:
            elapsed = int(form.get("elapsed_ms") or "")
        except ValueError:
            elapsed = None
        try:
            store.record(reader, position, study.order(reader)[position], call, confidence, condition, elapsed)
        except StudyError:
            abort(400)
        return redirect(url_for("study.page", token=token, begin=1), 303)

    return bp
