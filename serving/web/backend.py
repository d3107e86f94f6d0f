"""What the web app needs from the model side: served models on Triton, facts from the registry.

The page never touches a model file. It calls three Triton models over gRPC (generator,
encoder, domain classifier, names in ``web:``) and reads the generator version's metrics and
tags from the MLflow registry (``models:/<name>@<alias>``). :class:`TritonBackend` is the one
implementation; the app takes any object with the same methods, so tests hand it a
backend pointed at a real tritonserver.

How it behaves when a dependency is slow or gone:

- **Triton** is asked whether the generator is ready on every request (one loopback RPC with
  ``web.health_timeout_s``): down means :class:`ServiceUnavailable` at once, which the app turns
  into a 503 page with a retry button, and back means 200 on the next request. Every Triton
  call has a timeout, and all calls of one request share one deadline (``web.request_deadline_s``,
  started by :meth:`TritonBackend.begin_request`).
- **Generation is pinned** to the version the page names: the generator is called with that
  Triton model version and the response's version is checked (``serving.client``), so after a
  promotion the page, the audit log and the DICOM files cannot name a version other than the one
  that made the pixels; a version no longer served is a 503 and the next request re-reads it.
- **MLflow** is read by one background refresh at a time (``web.model_info_ttl_s``), with short
  timeouts and no retries (``web.registry_timeout_s``). The page shows the facts it has, stale
  ones included, while a refresh runs or after one fails (the note says how old they are and
  why); no request waits on the registry for more than a second, and ``/healthz`` never does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from typing import Protocol

import numpy as np

from radsynth import metric_keys as mk
from radsynth.config import Params
from radsynth.errors import RadsynthError

log = logging.getLogger(__name__)
FIRST_REGISTRY_WAIT_S = 8.0                    # the most a request waits for the very first registry read (a fresh worker imports MLflow: seconds)


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
    registry_note: str | None                  # why registry facts are missing or stale, if they are
    encoder_ready: bool                        # the image -> z encoder is served
    classifier_ready: bool                     # the domain classifier is served


class Backend(Protocol):
    def model_info(self) -> ModelInfo: ...

    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray: ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def classify(self, images: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class RegistryFacts:
    """One read of ``registry.model_name@registry.champion_alias`` from the registry."""

    version: str | None
    metrics: dict[str, float]
    unavailable: dict[str, str]
    tags: dict[str, str]
    note: str | None                           # why facts are missing (None: read fine)
    at: float                                  # time.monotonic() of the read


def limit_mlflow_http(timeout_s: float) -> None:
    """Short timeouts and no retries for every MLflow REST call of this process (the web app).

    MLflow's defaults (7 retries with backoff, 120 s timeout) would hold a thread for minutes per
    call when the tracking server is down; its client reads these variables at call time.
    """
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))


def registry_facts(params: Params) -> tuple[str | None, dict[str, float], dict[str, str], dict[str, str], str | None]:
    """Version, metrics, unavailable reasons and tags of ``registry.model_name@registry.champion_alias``.

    Returns:
        ``(version, metrics, unavailable, tags, note)``; on any registry trouble the first
        four are empty and ``note`` says what happened (the page shows it).
    """
    names = params.registry
    try:
        from radsynth.registry import reader

        client = reader(params)
        mv = client.get_model_version_by_alias(names.model_name, names.champion_alias)
        run = client.get_run(mv.run_id) if mv.run_id else None
    except Exception as exc:  # MLflow raises many types (missing alias, unreachable server, no DB)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, {}, {}, {}, f"registry facts for {names.model_name}@{names.champion_alias} are unavailable ({reason})"
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


@dataclasses.dataclass(frozen=True)
class _Served:
    """What Triton says about the generator (and whether encoder / classifier are served)."""

    name: str
    version: str
    classes: tuple[str, ...]
    z_dim: int
    img_resolution: int
    img_channels: int
    encoder_ready: bool
    classifier_ready: bool
    at: float


class TritonBackend:
    """Generator, encoder and classifier on a running Triton, over gRPC; facts from MLflow.

    Every call goes through :class:`serving.client.Client` (one per thread: timeouts, error
    mapping): the generator with ``infer`` (pinned to the page's version), the encoder and
    classifier, which take images rather than ``(z, class)``, with ``run``.

    Args:
        params: the resolved config (``web`` section and ``paths.mlflow_uri``).
    """

    def __init__(self, params: Params):
        self.params = params
        self.cfg = params.web
        self.names = params.registry                # model names and the alias shown (registry.*)
        self._local = threading.local()
        self._served_lock = threading.Lock()
        self._served: _Served | None = None
        self._registry_lock = threading.Lock()
        self._registry: RegistryFacts | None = None
        self._registry_good: RegistryFacts | None = None  # the last read that succeeded
        self._refreshing: threading.Thread | None = None
        self._first_read = threading.Event()
        limit_mlflow_http(self.cfg.registry_timeout_s)

    # -- per request -------------------------------------------------------------------
    def begin_request(self, deadline_s: float) -> None:
        """Start this thread's request deadline: every Triton call until the next one shares it."""
        self._local.deadline = time.monotonic() + deadline_s
        self._local.version = None

    def _budget(self, cap: float) -> float:
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return cap
        left = deadline - time.monotonic()
        if left <= 0.05:
            raise ServiceUnavailable(f"the request took longer than its {self.cfg.request_deadline_s:g} s deadline "
                                     "(web.request_deadline_s); the image server is slow or overloaded")
        return min(cap, left)

    # -- transport ---------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from serving.client import READ_KEY_HEADER, Client
            from serving.server import read_key

            key = read_key(self.params.serve)  # $RADSYNTH_TRITON_READ_KEY or the file `radsynth serve` wrote
            client = Client(self.cfg.triton_url, "grpc", self.names.model_name, "", timeout_s=self.cfg.triton_timeout_s,
                            retries=0, backoff_s=0.1, max_images_per_call=max(64, 2 * self.cfg.max_images),
                            headers={READ_KEY_HEADER: key} if key else {})
            self._local.client = client
        client.timeout_s = self._budget(self.cfg.triton_timeout_s)
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
            return self._client().run(model, inputs, [output])[output]
        except ClientError as exc:
            raise self._unavailable(f"model {model}", exc) from None

    def _optional_ready(self, model: str, expect: dict[str, int]) -> bool:
        """True when ``model`` is served, ready, and its config parameters agree with ``expect``."""
        from serving.client import ClientError

        try:
            parameters = self._client().model_parameters(model)
        except ClientError:  # absent or unreachable: the page says the feature is unavailable
            return False
        for key, value in expect.items():
            if key in parameters and parameters[key] != str(value):
                log.warning("%s serves %s=%s but the generator needs %s; not used", model, key, parameters[key], value)
                return False
        return True

    # -- Triton facts ------------------------------------------------------------------
    def _check_ready(self, timeout_s: float) -> None:
        """Raise :class:`ServiceUnavailable` unless the generator (at the known version) is ready now."""
        client = self._client()
        served = self._served
        version = served.version if served is not None else ""
        if not client.is_ready(self.names.model_name, version, timeout_s=min(timeout_s, client.timeout_s)):
            self._served = None  # re-read the config when it is back (it may be another version)
            if served is not None and client.is_ready(self.names.model_name, "", timeout_s=min(timeout_s, client.timeout_s)):
                raise ServiceUnavailable(f"the image server no longer serves version {served.version} of "
                                         f"{self.names.model_name}; reload the page to use the version it serves now")
            self._drop_client()  # a fresh channel next time: gRPC's reconnect backoff would add seconds after a restart
            raise ServiceUnavailable(f"the image server at {self.cfg.triton_url} is not reachable "
                                     f"or {self.names.model_name} is not ready")

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            client.close()

    def _served_facts(self) -> _Served:
        """Triton's facts, re-read after ``web.model_info_ttl_s`` by one thread while others use the old ones."""
        from serving.client import ClientError

        served = self._served
        fresh = served is not None and time.monotonic() - served.at < self.cfg.model_info_ttl_s
        if fresh:
            return served
        if not self._served_lock.acquire(blocking=served is None):
            return served  # another thread is re-reading; these are at most one TTL old
        try:
            if self._served is not None and time.monotonic() - self._served.at < self.cfg.model_info_ttl_s:
                return self._served
            client = self._client()
            client.model_version = ""  # the newest version the server serves
            try:
                info = client.refresh()
            except ClientError as exc:
                self._served = None
                raise self._unavailable(f"the generator {self.names.model_name}", exc) from None
            dims = {"z_dim": info.z_dim, "img_resolution": info.img_resolution, "img_channels": info.img_channels}
            self._served = _Served(
                name=info.name, version=info.version, classes=tuple(info.classes), z_dim=info.z_dim,
                img_resolution=info.img_resolution, img_channels=info.img_channels,
                encoder_ready=self._optional_ready(self.names.encoder_name, dims),
                classifier_ready=self._optional_ready(self.names.classifier_name,
                                                      {k: v for k, v in dims.items() if k != "z_dim"}),
                at=time.monotonic())
            return self._served
        finally:
            self._served_lock.release()

    # -- registry facts ----------------------------------------------------------------
    def _refresh_registry(self) -> None:
        try:
            version, metrics, unavailable, tags, note = registry_facts(self.params)
            now = time.monotonic()
            facts = RegistryFacts(version, metrics, unavailable, tags, note, now)
            good = self._registry_good
            if note is None:
                self._registry_good = facts
            elif good is not None:  # keep the last good read (through any number of failed refreshes), say it is stale
                facts = dataclasses.replace(good, note=f"{note}; showing facts read {now - good.at:.0f} s ago",
                                            at=now - self.cfg.model_info_ttl_s / 2)  # retry sooner
            self._registry = facts
        except Exception as exc:  # never let the refresher die silently
            log.warning("registry refresh failed: %s", type(exc).__name__)
        finally:
            self._first_read.set()
            with self._registry_lock:
                self._refreshing = None

    def _registry_facts(self, wait_s: float) -> RegistryFacts | None:
        """The newest registry facts; starts one background refresh when they are stale or absent."""
        facts = self._registry
        stale = facts is None or time.monotonic() - facts.at >= self.cfg.model_info_ttl_s
        if stale:
            with self._registry_lock:
                if self._refreshing is None:
                    self._refreshing = threading.Thread(target=self._refresh_registry, name="radsynth-registry", daemon=True)
                    self._refreshing.start()
        if facts is None and wait_s > 0:
            self._first_read.wait(wait_s)
            facts = self._registry
        return facts

    def _info(self, served: _Served, facts: RegistryFacts | None) -> ModelInfo:
        if facts is None:
            reg_version, metrics, unavailable, tags = None, {}, {}, {}
            note = (f"registry facts for {self.names.model_name}@{self.names.champion_alias} are not loaded yet "
                    "(the registry is slow or unreachable); they appear when it answers")
        else:
            reg_version, metrics, unavailable, tags, note = facts.version, facts.metrics, facts.unavailable, facts.tags, facts.note
        if reg_version and reg_version != served.version:
            note = (note + "; " if note else "") + (
                f"the registry's {self.names.champion_alias} is version {reg_version} but the image server serves "
                f"version {served.version}; the page shows the served one, whose evaluation is not loaded"
            )
            metrics, unavailable, tags = {}, {}, {}
        return ModelInfo(
            name=served.name, version=served.version, alias=self.names.champion_alias, registry_version=reg_version,
            classes=served.classes, z_dim=served.z_dim, img_resolution=served.img_resolution,
            img_channels=served.img_channels, metrics=metrics, unavailable=unavailable, tags=tags, registry_note=note,
            encoder_ready=served.encoder_ready, classifier_ready=served.classifier_ready,
        )

    def model_info(self) -> ModelInfo:
        """Served version, classes and shapes from Triton (checked ready now); registry facts as cached.

        Raises:
            ServiceUnavailable: Triton is down or the generator is not ready.
        """
        self._check_ready(self.cfg.health_timeout_s)
        served = self._served_facts()
        info = self._info(served, self._registry_facts(FIRST_REGISTRY_WAIT_S))
        self._local.version = info.version
        return info

    def health(self) -> ModelInfo:
        """As :meth:`model_info` but never waits on the registry, and all within 1 s (``/healthz``)."""
        self.begin_request(min(1.0, self.cfg.request_deadline_s))
        self._check_ready(self.cfg.health_timeout_s)
        served = self._served_facts()
        info = self._info(served, self._registry_facts(0.0))
        return info

    # -- inference ---------------------------------------------------------------------
    def generate(self, z: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``G(z [N, z_dim], class [N]) -> float32 [N, C, H, W]`` in [-1, 1], by the version the page names."""
        from serving.client import ClientError

        client = self._client()
        pinned = getattr(self._local, "version", None) or (self._served.version if self._served else "")
        client.model_version = pinned
        try:
            return client.infer(z.astype(np.float32), classes.astype(np.int64))
        except ClientError as exc:
            self._served = None  # the next request re-reads what is served
            raise self._unavailable(f"version {pinned} of the generator {self.names.model_name}", exc) from None
        finally:
            client.model_version = ""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``E(image [N, C, R, R] in [-1, 1]) -> z [N, z_dim]``."""
        return self._infer(self.names.encoder_name, {"image": images.astype(np.float32)}, "z")

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``[N, num_classes]`` of the domain classifier."""
        logits = self._infer(self.names.classifier_name, {"image": images.astype(np.float32)}, "logits").astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
