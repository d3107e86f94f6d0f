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
from typing import Any, Protocol

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
    return str(mv.version), metrics, unavailable, tags, None


class TritonBackend:
    """Generator, encoder and classifier on a running Triton, over gRPC; facts from MLflow.

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
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(url=self.cfg.triton_url)
            self._local.client = client
        return client

    def _unavailable(self, what: str, exc: BaseException) -> ServiceUnavailable:
        text = str(exc)
        if "UNAVAILABLE" in text or "failed to connect" in text.lower() or "connection refused" in text.lower():
            why = f"the image server at {self.cfg.triton_url} is not reachable"
        elif "DEADLINE" in text.upper():
            why = f"the image server at {self.cfg.triton_url} did not answer within {self.cfg.triton_timeout_s:g} s"
        else:
            why = f"{what} is not ready on the image server ({text.splitlines()[0][:160] if text else type(exc).__name__})"
        return ServiceUnavailable(why)

    def _ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(self._client().is_model_ready(model, version, client_timeout=self.cfg.triton_timeout_s))
        except Exception as exc:  # tritonclient wraps gRPC errors in InferenceServerException
            raise self._unavailable(f"model {model}", exc) from None

    def _infer(self, model: str, inputs: dict[str, np.ndarray], output: str, version: str = "") -> np.ndarray:
        import tritonclient.grpc as grpcclient

        tensors = []
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            dtype = "FP32" if arr.dtype == np.float32 else "INT64"
            t = grpcclient.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            tensors.append(t)
        try:
            result = self._client().infer(
                model, tensors, model_version=version, outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self.cfg.triton_timeout_s,
            )
        except Exception as exc:
            raise self._unavailable(f"model {model}", exc) from None
        return result.as_numpy(output)

    # -- facts -------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """Served version, classes and shapes from Triton; metrics from the registry (cached).

        Raises:
            ServiceUnavailable: Triton is down or the generator is not ready.
        """
        with self._lock:
            if self._info is not None and time.monotonic() - self._info_at < self.cfg.model_info_ttl_s:
                return self._info
        name = self.cfg.model_name
        if not self._ready(name):
            raise ServiceUnavailable(f"the generator {name} is loaded on the image server but not ready yet")
        try:
            meta = self._client().get_model_metadata(name, as_json=True, client_timeout=self.cfg.triton_timeout_s)
            config = self._client().get_model_config(name, as_json=True, client_timeout=self.cfg.triton_timeout_s)["config"]
        except Exception as exc:
            raise self._unavailable(f"the generator {name}", exc) from None
        served = sorted((v for v in meta.get("versions", []) if str(v).isdigit()), key=int)
        parameters = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        classes = tuple(json.loads(parameters.get("classes", "[]")))
        if not classes:
            raise ServiceUnavailable(f"the served {name} does not carry its class names (config parameter 'classes')")
        z_dim = int(parameters.get("z_dim") or _input_dim(meta, "z"))
        reg_version, metrics, unavailable, tags, note = registry_facts(self.params)
        version = reg_version if reg_version in served else (served[-1] if served else "")
        if reg_version and reg_version not in served:
            note = (note + "; " if note else "") + (
                f"the registry's {self.cfg.model_alias} is version {reg_version} but the image server serves "
                f"{', '.join(served) or 'no numbered version'}; the page shows the served one"
            )
            metrics, unavailable, tags = {}, {}, {}
        info = ModelInfo(
            name=name,
            version=version,
            alias=self.cfg.model_alias,
            registry_version=reg_version,
            classes=classes,
            z_dim=z_dim,
            img_resolution=int(parameters.get("img_resolution") or _output_dims(meta, "image")[-1]),
            img_channels=int(parameters.get("img_channels") or _output_dims(meta, "image")[-3]),
            metrics=metrics,
            unavailable=unavailable,
            tags=tags,
            registry_note=note,
            encoder_ready=self._optional_ready(self.cfg.encoder_name),
            classifier_ready=self._optional_ready(self.cfg.classifier_name),
        )
        with self._lock:
            self._info, self._info_at = info, time.monotonic()
        return info

    def _optional_ready(self, model: str) -> bool:
        try:
            return self._ready(model)
        except ServiceUnavailable:
            return False

    # -- inference ---------------------------------------------------------------------
    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``G(z [N, z_dim], class [N]) -> float32 [N, C, H, W]`` in [-1, 1]."""
        info = self.model_info()
        return self._infer(info.name, {"z": z.astype(np.float32), "class": classes.astype(np.int64)}, "image", info.version)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``E(image [N, C, R, R] in [-1, 1]) -> z [N, z_dim]``."""
        return self._infer(self.cfg.encoder_name, {"image": images.astype(np.float32)}, "z")

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[N, num_classes]`` of the domain classifier."""
        logits = self._infer(self.cfg.classifier_name, {"image": images.astype(np.float32)}, "logits").astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _input_dim(meta: dict[str, Any], name: str) -> int:
    for t in meta.get("inputs", []):
        if t.get("name") == name:
            return int(t["shape"][-1])
    raise ServiceUnavailable(f"the served generator has no input {name!r}")


def _output_dims(meta: dict[str, Any], name: str) -> list[int]:
    for t in meta.get("outputs", []):
        if t.get("name") == name:
            return [int(d) for d in t["shape"]]
    raise ServiceUnavailable(f"the served generator has no output {name!r}")
