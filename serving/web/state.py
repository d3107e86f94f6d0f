"""What every request of one web app shares: one typed :class:`WebState` on ``app.extensions``.

The views (``serving/web/views``) read it with :func:`web_state`; nothing is kept in closures or
module globals, so two apps in one process (tests, gunicorn's preloaded master) never share state.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flask import current_app
from itsdangerous import BadSignature, URLSafeSerializer

from radsynth.config import Params, WebConfig
from serving.web.backend import Backend, ModelInfo
from serving.web.uploads import Reference

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

    from serving.web.card import Card

EXTENSION = "radsynth"                         # the key of WebState in app.extensions


class FormError(Exception):
    """A bad form value or page token: shown on the form (or an error page) with a 4xx status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class CardSource(Protocol):
    def get(self, name: str, version: str) -> "Card": ...


class AuditLog:
    """Append-only JSON lines, one per generation; each line written with a single O_APPEND write."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


@dataclasses.dataclass(frozen=True)
class WebState:
    """The served models, the card source, the audit log and the app's signing keys."""

    params: Params
    backend: Backend                           # the served models (TritonBackend in production)
    cards: CardSource                          # model cards by (name, version)
    audit: AuditLog
    signer: URLSafeSerializer                  # signs the result page's preprocessed upload (Regenerate)
    sealer: "Fernet"                           # encrypts an upload's latent inside download links
    body_part: str                             # BodyPartExamined of generated DICOM ("" when the data allows several)

    @classmethod
    def build(cls, params: Params, secret: str, backend: Backend | None = None, cards: CardSource | None = None) -> "WebState":
        """The state of one app; ``backend`` and ``cards`` default to Triton and the MLflow registry."""
        from serving.web.backend import TritonBackend
        from serving.web.card import RegistryCards

        parts = params.data.allowed_body_parts
        return cls(params=params, backend=backend or TritonBackend(params), cards=cards or RegistryCards(params),
                   audit=AuditLog(params.web.audit_log), signer=URLSafeSerializer(secret, salt="radsynth-web-reference"),
                   sealer=_sealer(secret), body_part=parts[0] if len(parts) == 1 else "")

    @property
    def cfg(self) -> WebConfig:
        return self.params.web

    # -- the preprocessed upload, carried by the result page in a signed field ----------
    def pack_reference(self, ref: Reference) -> str:
        return self.signer.dumps({
            "kind": ref.kind, "w": ref.width, "h": ref.height, "shape": list(ref.image.shape),
            "pixels": base64.b64encode(ref.image.tobytes()).decode("ascii"), "warnings": list(ref.warnings),
        })

    def unpack_reference(self, token: str, info: ModelInfo) -> Reference:
        try:
            data = self.signer.loads(token)
            shape = tuple(int(s) for s in data["shape"])
            image = np.frombuffer(base64.b64decode(data["pixels"]), dtype=np.uint8).reshape(shape)
        except (BadSignature, KeyError, ValueError, TypeError):
            raise FormError("The reference image on this page could not be verified. Upload it again.", 400) from None
        if shape != (info.img_channels, info.img_resolution, info.img_resolution):
            raise FormError("The served model changed since this page was made. Upload the image again.", 409)
        return Reference(kind=str(data["kind"]), width=int(data["w"]), height=int(data["h"]), image=image.copy(),
                         warnings=tuple(str(w) for w in data.get("warnings", ())))

    # -- an upload's encoder latent, sealed into download links -------------------------
    def seal_latent(self, z0: np.ndarray, info: ModelInfo) -> str:
        blob = json.dumps({"v": info.version, "z": base64.b64encode(z0.astype(np.float32).tobytes()).decode("ascii")})
        return self.sealer.encrypt(blob.encode()).decode("ascii")

    def open_latent(self, token: str, info: ModelInfo) -> np.ndarray:
        from cryptography.fernet import InvalidToken

        try:
            data = json.loads(self.sealer.decrypt(token.encode("ascii"), ttl=self.cfg.download_ttl_s))
            z0 = np.frombuffer(base64.b64decode(data["z"]), dtype=np.float32)
        except (InvalidToken, KeyError, ValueError, TypeError, UnicodeEncodeError):
            raise FormError(f"This download link has expired: links made from an upload work for "
                            f"{self.cfg.download_ttl_s // 60} minutes and until the server restarts. Generate again.", 410) from None
        if data.get("v") != info.version or z0.shape != (info.z_dim,):
            raise FormError("The served model changed since this page was made. Generate again.", 409)
        return z0.copy()

    def store(self, ref: Reference) -> None:
        """Keep the preprocessed upload (PNG named by its sha256) when ``web.store_uploads`` says so."""
        if not self.cfg.store_uploads:
            return
        from radsynth.io import atomic_path
        from serving.web.generation import png_bytes

        blob = png_bytes(ref.image)
        target = Path(self.cfg.upload_dir) / f"{hashlib.sha256(blob).hexdigest()}.png"
        with atomic_path(target) as tmp:
            tmp.write_bytes(blob)


def web_state() -> WebState:
    """The state of the app handling this request."""
    return current_app.extensions[EXTENSION]


def _sealer(secret: str) -> "Fernet":
    """Fernet with a key derived from the app secret (every gunicorn worker shares the secret)."""
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"radsynth-web-download|" + secret.encode()).digest()))
