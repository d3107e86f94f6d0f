"""What the web app needs from the model side: served models on Triton, facts from the registry.

The page never touches a model file. It calls three Triton models over gRPC (generator,
encoder, domain classifier, names in ``web:``) and reads the generator version's metrics and
tags from the MLflow registry (``models:/<name>@<alias>``). :class:`TritonBackend` is the one
implementation; the app takes any object with the same methods, so tests hand it a
backend pointed at a real tritonserver.

Failures that mean "try again later" (server down, model not loaded, timeouts) raise
:class:`ServiceUnavailable`, which the app turns into a 503 page with a retry button.
Registry trouble is not fatal: the page shows the model facts as unavailable and says why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Protocol

import numpy as np

from radsynth import metric_keys as mk
from radsynth.config import Params
from radsynth.errors import RadsynthError

log = logging.getLogger(__name__)


class ServiceUnavailable(RadsynthError):
    """The image server or a model on it cannot answer now (the page answers 503)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Facts about the served generator that the page shows."""

    name: str                                  # registered + served model name
    version: str                               # the version Triton serves and we call
    alias: str                                 # registry alias configured (e.g. champion)
    registry_version: str | None               # the version the alias points at (None: registry unreachable)
    classes: tuple[str, ...]                   # condition names, index order
    z_dim: int
    img_resolution: int
    img_channels: int
    metrics: dict[str, float]                  # run metrics keyed by radsynth.metric_keys
    unavailable: dict[str, str]                # metric key -> reason it was not computed
    tags: dict[str, str]                       # model-version tags (gate, variant, commit, ...)
    registry_note: str | None                  # why registry facts are missing, if they are
    encoder_ready: bool                        # the image -> z encoder is served
    classifier_ready: bool                     # the domain classifier is served


class Backend(Protocol):
    def model_info(self) -> ModelInfo: ...

    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray: ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def classify(self, images: np.ndarray) -> np.ndarray: ...


def registry_facts(params: Params) -> tuple[str | None, dict[str, float], dict[str, str], dict[str, str], str | None]:
    """Version, metrics, unavailable reasons and tags of ``web.model_name@web.model_alias``.

    Returns:
        ``(version, metrics, unavailable, tags, note)``; on any registry trouble the first
        four are empty and ``note`` says what happened (the page shows it).
    """
    cfg = params.web
    try:
        import os

        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or params.paths.mlflow_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mv = client.get_model_version_by_alias(cfg.model_name, cfg.model_alias)
        run = client.get_run(mv.run_id) if mv.run_id else None
    except Exception as exc:  # MLflow raises many types (missing alias, unreachable server, no DB)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, {}, {}, {}, f"registry facts for {cfg.model_name}@{cfg.model_alias} are unavailable ({reason})"
    metrics = dict(run.data.metrics) if run else {}
    tags = dict(mv.tags or {})
    unavailable: dict[str, str] = {}
    for source in ((run.data.tags if run else {}), tags):
        raw = source.get(mk.UNAVAILABLE)
        if raw:
            try:
                parsed = json.loads(raw)
                if isinstance(parsed, dict):
                    unavailable.update({str(k): str(v) for k, v in parsed.items()})
            except ValueError:
                pass
        for key, value in source.items():
            if key.startswith(mk.UNAVAILABLE + "."):
                unavailable[key[len(mk.UNAVAILABLE) + 1:]] = str(value)
    if run is not None and not unavailable:
        unavailable.update(_unavailable_from_artifact(client, run.info.run_id))
    return str(mv.version), metrics, unavailable, tags, None


def _unavailable_from_artifact(client, run_id: str) -> dict[str, str]:
    """``unavailable`` of the run's ``evaluate/evaluate.json`` artefact (the evaluation's reasons), if logged."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="radsynth-web-") as tmp:
            path = client.download_artifacts(run_id, "evaluate/evaluate.json", tmp)
            with open(path) as fh:
                found = json.load(fh).get(mk.UNAVAILABLE) or {}
    except Exception:  # not logged, or unreadable: reasons stay generic
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


class TritonBackend:
    """Generator, encoder and classifier on a running Triton, over gRPC; facts from MLflow.

    Every call goes through :class:`serving.client.Client` (one per thread: retries,
    timeouts, error mapping): the generator with ``infer``, the encoder and classifier,
    which take images rather than ``(z, class)``, with ``run``.

    Args:
        params: the resolved config (``web`` section and ``paths.mlflow_uri``).
    """

    def __init__(self, params: Params):
        self.params = params
        self.cfg = params.web
        self._local = threading.local()
        self._lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._info_at = 0.0

    # -- transport ---------------------------------------------------------------------
    def _generator(self):
        client = getattr(self._local, "generator", None)
        if client is None:
            from serving.client import Client

            client = Client(self.cfg.triton_url, "grpc", self.cfg.model_name, "", timeout_s=self.cfg.triton_timeout_s,
                            retries=1, backoff_s=0.1, max_images_per_call=max(64, 2 * self.cfg.max_images))
            self._local.generator = client
        return client

    def _unavailable(self, what: str, exc: BaseException) -> ServiceUnavailable:
        text = str(exc)
        low = text.lower()
        if "unavailable" in low or "failed to connect" in low or "connection refused" in low or "did not answer" in low:
            why = f"the image server at {self.cfg.triton_url} is not reachable"
        elif "deadline" in low:
            why = f"the image server at {self.cfg.triton_url} did not answer within {self.cfg.triton_timeout_s:g} s"
        else:
            why = f"{what} is not ready on the image server ({text.splitlines()[0][:200] if text else type(exc).__name__})"
        return ServiceUnavailable(why)

    def _infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        from serving.client import ClientError

        try:
            return self._generator().run(model, inputs, [output])[output]
        except ClientError as exc:
            raise self._unavailable(f"model {model}", exc) from None

    def _optional_ready(self, model: str, expect: dict[str, int]) -> bool:
        """True when ``model`` is served, ready, and its config parameters agree with ``expect``."""
        from serving.client import ClientError

        try:
            parameters = self._generator().model_parameters(model)
        except ClientError:  # absent or unreachable: the page says the feature is unavailable
            return False
        for key, value in expect.items():
            if key in parameters and parameters[key] != str(value):
                log.warning("%s serves %s=%s but the generator needs %s; not used", model, key, parameters[key], value)
                return False
        return True

    # -- facts -------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """Served version, classes and shapes from Triton; metrics from the registry (cached).

        Raises:
            ServiceUnavailable: Triton is down or the generator is not ready.
        """
        from serving.client import ClientError

        with self._lock:
            if self._info is not None and time.monotonic() - self._info_at < self.cfg.model_info_ttl_s:
                return self._info
        try:
            served = self._generator().refresh()
        except ClientError as exc:
            raise self._unavailable(f"the generator {self.cfg.model_name}", exc) from None
        reg_version, metrics, unavailable, tags, note = registry_facts(self.params)
        if reg_version and reg_version != served.version:
            note = (note + "; " if note else "") + (
                f"the registry's {self.cfg.model_alias} is version {reg_version} but the image server serves "
                f"version {served.version}; the page shows the served one, whose evaluation is not loaded"
            )
            metrics, unavailable, tags = {}, {}, {}
        info = ModelInfo(
            name=served.name,
            version=served.version,
            alias=self.cfg.model_alias,
            registry_version=reg_version,
            classes=tuple(served.classes),
            z_dim=served.z_dim,
            img_resolution=served.img_resolution,
            img_channels=served.img_channels,
            metrics=metrics,
            unavailable=unavailable,
            tags=tags,
            registry_note=note,
            encoder_ready=self._optional_ready(self.cfg.encoder_name, {
                "z_dim": served.z_dim, "img_resolution": served.img_resolution, "img_channels": served.img_channels}),
            classifier_ready=self._optional_ready(self.cfg.classifier_name, {
                "img_resolution": served.img_resolution, "img_channels": served.img_channels}),
        )
        with self._lock:
            self._info, self._info_at = info, time.monotonic()
        return info

    # -- inference ---------------------------------------------------------------------
    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``G(z [N, z_dim], class [N]) -> float32 [N, C, H, W]`` in [-1, 1]."""
        from serving.client import ClientError

        try:
            return self._generator().infer(z.astype(np.float32), classes.astype(np.int64))
        except ClientError as exc:
            raise self._unavailable(f"the generator {self.cfg.model_name}", exc) from None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``E(image [N, C, R, R] in [-1, 1]) -> z [N, z_dim]``."""
        return self._infer(self.cfg.encoder_name, {"image": images.astype(np.float32)}, "z")

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[N, num_classes]`` of the domain classifier."""
        logits = self._infer(self.cfg.classifier_name, {"image": images.astype(np.float32)}, "logits").astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
