"""Blueprint ``site``: what every response of the app shares, whichever blueprint answers.

- one deadline for all of a request's Triton calls (``web.request_deadline_s``);
- security headers (a strict Content-Security-Policy, no sniffing, same-origin referrers;
  ``no-store`` on every POST and permalink);
- error pages: a page with a sentence saying what to do, never a traceback.
"""

from __future__ import annotations

import logging

from flask import Blueprint, render_template, request, url_for
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from serving.web.backend import ServiceUnavailable
from serving.web.forms import form_page
from serving.web.state import web_state

log = logging.getLogger(__name__)
bp = Blueprint("site", __name__)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@bp.before_app_request
def request_deadline() -> None:
    state = web_state()
    begin = getattr(state.backend, "begin_request", None)
    if begin is not None:
        begin(state.cfg.request_deadline_s)


@bp.after_app_request
def security_headers(resp):
    resp.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    if request.method == "POST" or request.endpoint == "pages.result":
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


@bp.app_errorhandler(ServiceUnavailable)
def unavailable(exc: ServiceUnavailable):
    retry = request.full_path if request.method == "GET" else url_for("pages.index")
    page = render_template("error.html", status=503, title="The image server is not available",
                           message=f"Images cannot be generated right now: {exc}.",
                           hint="Nothing you sent was kept. Wait a moment and try again.",
                           retry=retry)
    return page, 503, {"Retry-After": "10"}


@bp.app_errorhandler(RequestEntityTooLarge)
def too_large(exc: RequestEntityTooLarge):
    message = (f"The upload is larger than the {web_state().cfg.max_upload_bytes / 2**20:.0f} MiB limit. "
               "Nothing was stored. Choose a smaller file.")
    try:
        info = web_state().backend.model_info()
    except ServiceUnavailable:
        return render_template("error.html", status=413, title="File too large", message=message,
                               hint=None, retry=url_for("pages.index")), 413
    return form_page(info, message, 413)


@bp.app_errorhandler(HTTPException)
def http_error(exc: HTTPException):
    return render_template("error.html", status=exc.code, title=exc.name, message=exc.description,
                           hint=None, retry=url_for("pages.index")), exc.code


@bp.app_errorhandler(Exception)
def internal(exc: Exception):
    log.exception("unhandled error in the web app")
    return render_template("error.html", status=500, title="Something went wrong",
                           message="The request could not be completed. Nothing you sent was kept.",
                           hint="Try again; if it keeps happening, tell the team that runs this service.",
                           retry=url_for("pages.index")), 500
