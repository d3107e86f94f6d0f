"""Blueprint ``card``: the model card of the version this page serves (``/model-card``) and its
sample grid (``/model-card/grid.png``), from the registry (``serving/web/card.py``)."""

from __future__ import annotations

import io

from flask import Blueprint, render_template, send_file, url_for

from serving.web import card as model_card
from serving.web.state import web_state

bp = Blueprint("card", __name__)


@bp.get("/model-card")
def page():
    state = web_state()
    info = state.backend.model_info()
    found = state.cards.get(info.name, info.version)
    html = model_card.to_html(found.markdown, url_for("card.grid") if found.grid_png else None) if found.markdown else None
    return render_template("model_card.html", info=info, card=found, card_html=html)


@bp.get("/model-card/grid.png")
def grid():
    state = web_state()
    info = state.backend.model_info()
    found = state.cards.get(info.name, info.version)
    if not found.grid_png:
        return render_template("error.html", status=404, title="No sample grid", message=found.note or
                               "This model card has no sample grid.", hint=None, retry=url_for("card.page")), 404
    return send_file(io.BytesIO(found.grid_png), mimetype="image/png", download_name="model_card_grid.png")
