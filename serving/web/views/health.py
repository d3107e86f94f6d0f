"""Blueprint ``health``: ``/healthz``, JSON; 503 when Triton or the generator is not ready.

It never waits on the registry: the backend's ``health()`` asks Triton only, within
``web.health_timeout_s``.
"""

from __future__ import annotations

from flask import Blueprint

from serving.web.backend import ServiceUnavailable
from serving.web.state import web_state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    backend = web_state().backend
    try:
        info = backend.health() if hasattr(backend, "health") else backend.model_info()
    except ServiceUnavailable as exc:
        return {"ready": False, "reason": str(exc)}, 503
    return {"ready": True, "model": info.name, "version": info.version, "classes": list(info.classes)}
