"""Thin Triton client for the radsynth generator: numpy + tritonclient only.

The latent ``z`` is drawn on the client with :func:`radsynth.latent.z_from_seed` (numpy
PCG64), so PyTorch, ONNX Runtime and Triton give the same image for the same seed and
condition. The class names travel with the model (Triton config parameter ``classes``);
nothing here hard-codes them.

Python use::

    from serving.client import Client
    with Client("127.0.0.1:8001") as client:            # gRPC; protocol="http" for HTTP
        images = client.generate("PNEUMONIA", n=4, seed=7)  # uint8 [4, H, W, C]
        print(client.info.classes)
        many = client.generate("NORMAL", n=10_000, seed=1)  # any n: chunked, several requests in flight
        for start, chunk in client.iter_generate("NORMAL", n=10**6, seed=1):  # the same, streamed
            ...

    from serving.client import generate                 # one-shot convenience
    images = generate("NORMAL", n=1, seed=3, url="127.0.0.1:8001")

Errors (all :class:`ClientError`, a ``RadsynthError``): :class:`ServerUnavailableError`,
:class:`ModelNotReadyError`, :class:`UnknownConditionError`, :class:`TooManyImagesError`,
:class:`InvalidInputError`. Transient failures (unavailable, deadline exceeded, overload)
are retried with exponential backoff first. Every call carries a timeout (``timeout_s``); with
``model_version`` set, inference is pinned to that version and a response from another version
is an error. Triton's model-config and statistics APIs are restricted (``radsynth serve``): the
client sends the read key (``headers``; default ``$RADSYNTH_TRITON_READ_KEY``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from radsynth.errors import RadsynthError
from radsynth.latent import new_seed, z_from_seed

DEFAULT_MODEL = "radsynth-generator"
READ_KEY_ENV = "RADSYNTH_TRITON_READ_KEY"     # key for Triton's restricted model-config / statistics APIs
READ_KEY_HEADER = "radsynth-read-key"
ADMIN_KEY_ENV = "RADSYNTH_TRITON_ADMIN_KEY"   # key for the repository index (and other admin APIs), when this process has it
ADMIN_KEY_HEADER = "radsynth-admin-key"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton expects restricted-protocol headers under this prefix on gRPC
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
_TRANSIENT = {
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED", "429", "502", "503", "504",
}


class ClientError(RadsynthError):
    """A request to the radsynth Triton server failed; the message says what to do."""


class ServerUnavailableError(ClientError):
    """The server cannot be reached (down, wrong address, or still starting)."""


class ModelNotReadyError(ClientError):
    """The server is up but the model is not loaded / ready."""


class UnknownConditionError(ClientError, ValueError):
    """The condition is not one of the model's classes."""


class TooManyImagesError(ClientError, ValueError):
    """More images were asked for in one call than the client or model allows."""


class InvalidInputError(ClientError, ValueError):
    """Tensors of the wrong shape or type (caught on the client or refused by the server)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the served model says about itself (from its Triton config)."""

    name: str
    version: str                               # registry version served (config parameter)
    classes: tuple[str, ...]
    z_dim: int
    img_resolution: int
    img_channels: int
    max_batch_size: int
    parameters: dict[str, str]                 # every config parameter (onnx_sha256, origin, ...)
    instances: int = 1                         # model instances in its config (per GPU on the gpu flavour)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One ``generate`` call's result with what is needed to reproduce it."""

    images: np.ndarray                         # uint8 [n, H, W, C]
    seed: int
    condition: str
    model_name: str
    model_version: str


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` float in [-1, 1] -> ``[N, H, W, C]`` uint8 (round half to even)."""
    scaled = np.rint((np.asarray(images, dtype=np.float32) + 1.0) * 127.5)  # [N, C, H, W]
    return np.clip(scaled, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)    # [N, H, W, C]


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def _message(exc: Exception) -> str:
    msg = getattr(exc, "message", None)
    text = msg() if callable(msg) else (msg or str(exc))
    text = str(text).strip()
    return text.splitlines()[0].split(" NOTE: ")[0] if text else type(exc).__name__


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    status = _status(exc)
    text = _message(exc).lower()
    if "restricted" in text:  # a missing/wrong key: retrying cannot help
        return False
    return status in _TRANSIENT or "failed to connect" in text or "connection refused" in text


def _count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}")
    return int(n)


def _latent_stream(seed: int, z_dim: int) -> Callable[[int], np.ndarray]:
    """``draw(k)`` -> the next ``k`` rows of ``z_from_seed(seed, n, z_dim)`` (same generator, same
    order: numpy fills ``[n, z_dim]`` row-major from one stream, so draws of any sizes concatenate
    to the same ``z``; ``tests/serving`` checks it against :func:`radsynth.latent.z_from_seed`)."""
    try:
        z_from_seed(seed, 0, z_dim)  # validates the seed with the one documented rule
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return lambda k: rng.standard_normal((k, z_dim), dtype=np.float32)  # [k, z_dim]


class Client:
    """A connection to one generator on one Triton server.

    Args:
        url: ``host:port``; default 127.0.0.1 and the protocol's default port.
        protocol: ``grpc`` (default) or ``http``.
        model_name: Triton model name.
        model_version: "" for the server's newest served version, or a number.
        timeout_s: per-request timeout (seconds).
        retries: retries on transient errors (0: try once).
        backoff_s: first retry delay; doubles each retry.
        max_images_per_call: images per request; a larger ``n`` is split into requests of this
            size (capped by the model's max batch); :meth:`infer` refuses more.
        max_in_flight: requests in flight while a large ``n`` is generated; 0: two per model
            instance in the served config (one computing, one queued behind it).
        headers: sent with every request; default the read key from ``$RADSYNTH_TRITON_READ_KEY``.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model_name: str = DEFAULT_MODEL,
        model_version: str = "",
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_images_per_call: int = 64,
        max_in_flight: int = 0,
        headers: dict[str, str] | None = None,
    ):
        if protocol not in DEFAULT_PORTS:
            raise ClientError(f"protocol {protocol!r}: use grpc or http")
        self.protocol = protocol
        self.url = url or f"127.0.0.1:{DEFAULT_PORTS[protocol]}"
        self.model_name = model_name
        self.model_version = str(model_version)
        self.timeout_s = float(timeout_s)
        self.retries = max(int(retries), 0)
        self.backoff_s = float(backoff_s)
        self.max_images_per_call = int(max_images_per_call)
        self.max_in_flight = max(int(max_in_flight), 0)
        import os

        if headers is None:
            key = os.environ.get(READ_KEY_ENV, "")
            headers = {READ_KEY_HEADER: key} if key else {}
        admin = os.environ.get(ADMIN_KEY_ENV, "")
        if admin and ADMIN_KEY_HEADER not in headers:
            headers = {**headers, ADMIN_KEY_HEADER: admin}
        if protocol == "grpc":
            restricted = (READ_KEY_HEADER, ADMIN_KEY_HEADER)
            headers = {(GRPC_RESTRICTED_PREFIX + k if k in restricted else k): v for k, v in headers.items()}
        self.headers = dict(headers)
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        if protocol == "grpc":
            self._client = tc.InferenceServerClient(self.url)
        else:
            self._client = tc.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s, concurrency=8
            )
        self._info: ModelInfo | None = None

    @classmethod
    def from_params(cls, params: Any, url: str | None = None, protocol: str | None = None) -> "Client":
        """A client for ``registry.model_name`` with the settings of ``params.serve``; the read key
        comes from ``$RADSYNTH_TRITON_READ_KEY`` or the key file ``radsynth serve`` wrote."""
        from serving.server import read_key

        cfg = params.serve
        protocol = protocol or cfg.protocol
        if not url:
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
            url = cfg.url or f"{host}:{cfg.grpc_port if protocol == 'grpc' else cfg.http_port}"
        key = read_key(cfg)
        return cls(url, protocol, params.registry.model_name, "", cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.max_images_per_call,
                   cfg.max_in_flight, headers={READ_KEY_HEADER: key} if key else {})

    # -- plumbing ---------------------------------------------------------------------

    def _timeout_kw(self) -> dict[str, Any]:
        """Per-call keywords: the timeout (gRPC; HTTP has it on the connection) and the headers."""
        kw: dict[str, Any] = {"headers": self.headers} if self.headers else {}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout_s
        return kw

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with retries on transient errors; map the final failure to a ClientError."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except ClientError:
                raise
            except Exception as exc:  # tritonclient raises its own type, grpc/gevent raise OSError subclasses
                if not _is_transient(exc):
                    raise self._translate(what, exc) from None
                if attempt == self.retries:
                    raise ServerUnavailableError(
                        f"Triton at {self.url} ({self.protocol}) did not answer {what} after {self.retries + 1} attempts "
                        f"({_message(exc)}); is it running? start it with `radsynth serve`, or check serve.url/--url"
                    ) from None
                time.sleep(delay)
                delay *= 2

    def _translate(self, what: str, exc: Exception) -> ClientError:
        status, text = _status(exc), _message(exc)
        if status in ("StatusCode.INVALID_ARGUMENT", "400") or "unexpected shape" in text or "expected" in text:
            return InvalidInputError(f"{self.model_name}: the server refused {what}: {text}")
        if "unknown model" in text.lower() or "not found" in text.lower() or "is not ready" in text.lower() or "unavailable" in text.lower():
            return ModelNotReadyError(f"{self.model_name}: {text}; models on {self.url}: {self._index_summary()}")
        if "restricted" in text.lower() or "unauthenticated" in text.lower() or "permission" in text.lower():
            return ClientError(f"{self.model_name} at {self.url}: {what} is restricted on this server; set "
                               f"${READ_KEY_ENV} to the key `radsynth serve` wrote beside its model repository")
        return ClientError(f"{self.model_name} at {self.url}: {what} failed: {text}")

    def _index_summary(self) -> str:
        try:
            index = self._client.get_model_repository_index(**({"as_json": True, **self._timeout_kw()} if self.protocol == "grpc" else {}))
            models = index.get("models", []) if isinstance(index, dict) else index
            return ", ".join(f"{m.get('name')} v{m.get('version', '?')} {m.get('state', '?')}" for m in models) or "none"
        except Exception:  # the index is a hint only
            return "unknown"

    # -- model info -------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        """The served model's classes, sizes and parameters (fetched once; see :meth:`refresh`)."""
        if self._info is None:
            self._info = self._fetch_info()
        return self._info

    def refresh(self) -> ModelInfo:
        """Re-read the model's config (after the server reloaded another version)."""
        self._info = None
        return self.info

    def _model_config(self, model_name: str, model_version: str = "") -> dict:
        """Liveness, readiness, then the served config of ``model_name`` (raises when not ready)."""
        self._call("a liveness check", lambda: self._client.is_server_live(**self._timeout_kw()))
        ready = self._call("a readiness check", lambda: self._client.is_model_ready(model_name, model_version, **self._timeout_kw()))
        if not ready:
            raise ModelNotReadyError(
                f"model {model_name!r} (version {model_version or 'newest'}) is not ready on {self.url}; "
                f"models there: {self._index_summary()}. Check the server log (`radsynth serve`)"
            )
        if self.protocol == "grpc":
            return self._call("the model config", lambda: self._client.get_model_config(model_name, model_version, as_json=True, **self._timeout_kw()))["config"]
        return self._call("the model config", lambda: self._client.get_model_config(model_name, model_version, **self._timeout_kw()))

    def is_ready(self, model_name: str | None = None, model_version: str | None = None, timeout_s: float | None = None) -> bool:
        """Whether ``model_name`` (default this client's model, at ``model_version``) is ready now:
        one attempt, no retries, within ``timeout_s`` (default the client's); False on any error."""
        name = model_name or self.model_name
        version = self.model_version if model_version is None else str(model_version)
        kw = {"headers": self.headers} if self.headers else {}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout_s if timeout_s is None else timeout_s
        try:
            return bool(self._client.is_model_ready(name, version, **kw))
        except Exception:  # unreachable, timed out, unknown model: not ready
            return False

    def model_parameters(self, model_name: str) -> dict[str, str]:
        """Config parameters of any served model (e.g. the encoder's ``z_dim``).

        Raises:
            ModelNotReadyError: the model is absent or not ready; ServerUnavailableError: no server.
        """
        config = self._model_config(model_name)
        return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}

    def _fetch_info(self) -> ModelInfo:
        config = self._model_config(self.model_name, self.model_version)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        missing = [k for k in ("classes", "z_dim", "img_resolution", "img_channels") if k not in params]
        if missing:
            raise ClientError(f"model {self.model_name!r} on {self.url} lacks config parameters {missing}; rebuild the repository with `radsynth serve`")
        return ModelInfo(
            name=self.model_name,
            version=params.get("registry_version", self.model_version or "?"),
            classes=tuple(json.loads(params["classes"])),
            z_dim=int(params["z_dim"]),
            img_resolution=int(params["img_resolution"]),
            img_channels=int(params["img_channels"]),
            max_batch_size=int(config.get("max_batch_size", 0)),
            parameters=params,
            instances=sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    def class_index(self, condition: str) -> int:
        """Index of a condition name; :class:`UnknownConditionError` lists the valid ones."""
        classes = self.info.classes
        if condition not in classes:
            raise UnknownConditionError(f"unknown condition {condition!r}; valid conditions: {', '.join(classes)}")
        return classes.index(condition)

    # -- inference --------------------------------------------------------------------

    def infer(self, z: np.ndarray, class_index: np.ndarray | Sequence[int]) -> np.ndarray:
        """Run the generator on explicit inputs.

        Args:
            z: float32 ``[N, z_dim]``.
            class_index: int ``[N]`` class indices.

        Returns:
            float32 ``[N, C, H, W]`` in [-1, 1].
        """
        info = self.info
        z = np.asarray(z)
        labels = np.asarray(class_index)
        if z.ndim != 2 or z.shape[1] != info.z_dim:
            raise InvalidInputError(f"z must be [N, {info.z_dim}] (z_dim of {self.model_name} v{info.version}), got {list(z.shape)}")
        if labels.ndim != 1 or labels.shape[0] != z.shape[0]:
            raise InvalidInputError(f"class must be [N] with N = {z.shape[0]} (rows of z), got {list(labels.shape)}")
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < 0 or labels.max() >= len(info.classes))):
            raise InvalidInputError(f"class indices must be integers in [0, {len(info.classes)}), got {labels.tolist()[:8]}")
        limit = min(self.max_images_per_call, info.max_batch_size or self.max_images_per_call)
        if z.shape[0] > limit or z.shape[0] < 1:
            raise TooManyImagesError(f"{z.shape[0]} images in one call; allowed 1..{limit} (split the request or raise serve.max_images_per_call)")
        return self._infer_raw(z.astype(np.float32, copy=False), labels.astype(np.int64).reshape(-1, 1))

    def _infer_raw(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Send tensors as they are (no client-side checks): ``z`` [N, D], ``class`` [N, 1]."""
        tc = self._tc
        z_in = tc.InferInput("z", list(z.shape), "FP32")
        z_in.set_data_from_numpy(z)
        c_in = tc.InferInput("class", list(labels.shape), "INT64")
        c_in.set_data_from_numpy(labels)
        out = [tc.InferRequestedOutput("image")]
        result = self._call(
            "an inference request",
            lambda: self._client.infer(self.model_name, [z_in, c_in], model_version=self.model_version, outputs=out, **self._timeout_kw()),
        )
        self._check_version(result)
        return result.as_numpy("image")  # [N, C, H, W]

    def _check_version(self, result: Any) -> None:
        """With a pinned ``model_version``, the response must come from that version."""
        if not self.model_version:
            return
        response = result.get_response()
        answered = str(response.get("model_version", "") if isinstance(response, dict) else getattr(response, "model_version", ""))
        if answered != self.model_version:
            raise ClientError(f"{self.model_name}: asked for version {self.model_version}, the server answered with "
                              f"version {answered or 'unknown'}; refresh the model info")

    def run(self, model_name: str, inputs: dict[str, np.ndarray], outputs: Sequence[str], model_version: str = "") -> dict[str, np.ndarray]:
        """Call any served model (e.g. ``radsynth-classifier``: ``{"image": [N, C, H, W]}`` -> ``logits``)
        with this client's timeout, retries and error mapping.

        Args:
            model_name: Triton model name.
            inputs: tensor name -> array (batch axis first).
            outputs: output tensor names to return.
            model_version: "" for the newest served version.

        Returns:
            output name -> array.
        """
        tc = self._tc
        dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.uint8): "UINT8"}
        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            if array.dtype not in dtypes:
                raise InvalidInputError(f"input {name!r}: dtype {array.dtype} not supported (use float32, int64, int32 or uint8)")
            tensor = tc.InferInput(name, list(array.shape), dtypes[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [tc.InferRequestedOutput(name) for name in outputs]
        result = self._call(
            f"an inference request to {model_name}",
            lambda: self._client.infer(model_name, tensors, model_version=model_version, outputs=requested, **self._timeout_kw()),
        )
        return {name: result.as_numpy(name) for name in outputs}

    @property
    def images_per_request(self) -> int:
        """Images in one request of a chunked :meth:`generate` (``max_images_per_call``, capped by the model)."""
        return max(1, min(self.max_images_per_call, self.info.max_batch_size or self.max_images_per_call))

    @property
    def in_flight(self) -> int:
        """Requests kept in flight by a chunked :meth:`generate`."""
        if self.protocol == "http":  # tritonclient's HTTP client is not thread-safe: one request at a time
            return 1
        return self.max_in_flight or 2 * self.info.instances

    def iter_generate(self, condition: str, n: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
        """Stream ``n`` images of ``condition`` as ``(first index, uint8 [k, H, W, C])`` chunks, in order.

        Requests of :attr:`images_per_request` images each, :attr:`in_flight` of them at once
        (memory stays bounded for any ``n``). ``z`` is drawn row by row from the seed's stream,
        so image ``i`` is the same whatever the chunking (and the first ``k`` images of ``n``
        are those of ``generate(condition, k, seed)``).

        Raises:
            InvalidInputError: ``n`` or ``seed`` invalid; UnknownConditionError; ClientError.
        """
        n = _count(n)
        index = self.class_index(condition)
        draw = _latent_stream(seed, self.info.z_dim)
        return self._stream(index, n, draw)

    def _stream(self, index: int, n: int, draw: Callable[[int], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        size, in_flight = self.images_per_request, self.in_flight

        def one(z: np.ndarray) -> np.ndarray:
            return to_uint8(self._infer_raw(z, np.full((z.shape[0], 1), index, dtype=np.int64)))  # [k, H, W, C]

        starts = range(0, n, size)
        if len(starts) == 1 or in_flight == 1:
            for start in starts:
                yield start, one(draw(min(size, n - start)))
            return
        with ThreadPoolExecutor(in_flight, thread_name_prefix="radsynth-client") as pool:
            pending: deque = deque()
            try:
                for start in starts:
                    pending.append((start, pool.submit(one, draw(min(size, n - start)))))
                    if len(pending) >= in_flight:
                        first, future = pending.popleft()
                        yield first, future.result()
                while pending:
                    first, future = pending.popleft()
                    yield first, future.result()
            finally:  # an error or an abandoned iterator: drop what was not sent yet
                for _, future in pending:
                    future.cancel()

    def sample(self, condition: str, n: int = 1, seed: int | None = None) -> Sample:
        """Generate ``n`` images of ``condition`` (any ``n``; see :meth:`iter_generate`) with seed and model version."""
        seed = new_seed() if seed is None else seed
        chunks = self.iter_generate(condition, n, seed)  # checks n, seed and condition first
        info = self.info
        try:
            images = np.empty((n, info.img_resolution, info.img_resolution, info.img_channels), dtype=np.uint8)
        except (MemoryError, ValueError):
            gib = n * info.img_resolution ** 2 * info.img_channels / 2**30
            raise InvalidInputError(f"n={n} images need {gib:.1f} GiB in memory; stream them with iter_generate() "
                                    "(`radsynth generate` writes them chunk by chunk)") from None
        for start, chunk in chunks:
            images[start:start + len(chunk)] = chunk
        return Sample(images, int(seed), condition, self.model_name, info.version)

    def generate(self, condition: str, n: int = 1, seed: int | None = None) -> np.ndarray:
        """``n`` uint8 images ``[n, H, W, C]`` of ``condition`` (any ``n``); same seed, same images."""
        return self.sample(condition, n, seed).images

    def statistics(self) -> dict[str, int]:
        """Server-side counters for this model: ``inference_count`` (images) and
        ``execution_count`` (batched model executions), summed over versions."""
        if self.protocol == "grpc":
            stats = self._call("statistics", lambda: self._client.get_inference_statistics(self.model_name, as_json=True, **self._timeout_kw()))
        else:
            stats = self._call("statistics", lambda: self._client.get_inference_statistics(self.model_name, **self._timeout_kw()))
        total = {"inference_count": 0, "execution_count": 0}
        for entry in stats.get("model_stats", []):
            for key in total:
                total[key] += int(entry.get(key, 0))
        return total

    # -- self-check -------------------------------------------------------------------

    def check(self, seed: int = 7, n: int = 2) -> list[tuple[str, bool, str]]:
        """Verify a live server: shapes, dtype, value range, determinism, seed sensitivity.

        Returns:
            ``(check name, passed, detail)`` per check.
        """
        info = self.info
        results: list[tuple[str, bool, str]] = []
        expected = (n, info.img_resolution, info.img_resolution, info.img_channels)
        z = z_from_seed(seed, n, info.z_dim)
        for index, name in enumerate(info.classes):
            raw = self.infer(z, np.full(n, index))
            images = to_uint8(raw)
            results.append((f"{name}: shape", images.shape == expected, f"{images.shape} (expected {expected})"))
            results.append((f"{name}: dtype", images.dtype == np.uint8 and raw.dtype == np.float32, f"{raw.dtype} -> {images.dtype}"))
            finite = bool(np.isfinite(raw).all())
            in_range = finite and float(raw.min()) >= -1.0 - 1e-4 and float(raw.max()) <= 1.0 + 1e-4
            results.append((f"{name}: range", in_range, f"[{np.nanmin(raw):.4f}, {np.nanmax(raw):.4f}] within [-1, 1], finite={finite}"))
            again = self.infer(z, np.full(n, index))
            diff = float(np.abs(again - raw).max())
            results.append((f"{name}: deterministic", diff <= 1e-5, f"max |diff| {diff:.2e} for seed {seed} twice"))
        other = self.infer(z_from_seed(seed + 1, n, info.z_dim), np.zeros(n, dtype=np.int64))
        first = self.infer(z, np.zeros(n, dtype=np.int64))
        moved = float(np.abs(other - first).max())
        results.append(("seeds differ", moved > 1e-3, f"max |diff| {moved:.3f} between seeds {seed} and {seed + 1}"))
        return results

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a broken channel is not an error worth raising
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate(condition: str, n: int = 1, seed: int | None = None, **client_kwargs: Any) -> np.ndarray:
    """One-shot: connect, generate ``n`` uint8 images ``[n, H, W, C]``, close.

    ``client_kwargs`` go to :class:`Client` (``url``, ``protocol``, ``timeout_s``, ...).
    """
    with Client(**client_kwargs) as client:
        return client.generate(condition, n, seed)
