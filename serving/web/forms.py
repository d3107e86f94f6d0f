"""The form: its CSRF token, the checks of its values, and the form page (with an error, if any)."""

from __future__ import annotations

import hmac
import secrets
from typing import Mapping

from flask import render_template, request, session

from radsynth.latent import MAX_SEED, new_seed
from serving.web.backend import ModelInfo
from serving.web.state import FormError, web_state


def csrf_token() -> str:
    """This session's CSRF token (one random token per session; the session cookie is signed)."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    """Every POST carries the session's token.

    Raises:
        FormError: missing or forged (400).
    """
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf", "")
    if not expected or not sent or not hmac.compare_digest(sent, expected):
        raise FormError("This form has expired or did not come from this site. Reload the page and try again.", 400)


def parse_choice(info: ModelInfo, source: Mapping[str, str]) -> tuple[str, int, int]:
    """``(condition, n, seed)`` from a form or query; an empty seed draws a new one.

    Raises:
        FormError: an unknown condition, a count outside ``1..web.max_images``, a bad seed (400).
    """
    state = web_state()
    max_images = state.cfg.max_images
    condition = (source.get("condition") or "").strip()
    if condition not in info.classes:
        choices = ", ".join(f"{state.params.display_name(c)} ({c})" for c in info.classes)
        raise FormError(f"Unknown condition {condition!r}. Choose one of: {choices}.", 400)
    raw_n = (source.get("n") or "1").strip()
    try:
        n = int(raw_n)
    except ValueError:
        raise FormError(f"Number of images must be a whole number, got {raw_n!r}.", 400) from None
    if not 1 <= n <= max_images:
        raise FormError(f"Number of images must be between 1 and {max_images}.", 400)
    raw_seed = (source.get("seed") or "").strip()
    if raw_seed == "":
        seed = new_seed()
    else:
        try:
            seed = int(raw_seed)
        except ValueError:
            raise FormError(f"The seed must be a whole number, got {raw_seed!r}.", 400) from None
        if not 0 <= seed <= MAX_SEED:
            raise FormError("The seed must be between 0 and 2^63 - 1.", 400)
    return condition, n, seed


def form_page(info: ModelInfo, error: str | None = None, status: int = 200, values: Mapping[str, str] | None = None):
    """The form, with the values sent back and the error above them (a ``(html, status)`` response)."""
    cfg = web_state().cfg
    values = values or {}
    return render_template(
        "index.html", info=info, error=error, max_images=cfg.max_images, max_bytes=cfg.max_upload_bytes,
        max_mib=cfg.max_upload_bytes / 2**20, max_mpix=cfg.max_pixels / 1e6,
        values={"condition": values.get("condition") or info.classes[0], "n": values.get("n") or 1,
                "seed": values.get("seed") or ""},
    ), status
