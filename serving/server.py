"""Start, watch and stop a real ``tritonserver`` on a model repository.

The binary is the system's ``tritonserver`` when one is on ``PATH`` (the NGC image), else the
one shipped in ``nvidia-pytriton``. For the pytriton binary this module prepares what
pytriton itself would: a backends folder holding the python backend and the stub built for
this Python version, ``LD_LIBRARY_PATH`` with pytriton's bundled libraries and this Python's
own ``lib`` (the stub links libpython; the pyenv build needs its own), and ``RADSYNTH_TRITON_PYTHONPATH``
with this interpreter's site-packages so ``model.py`` imports numpy and onnxruntime.

Python use::

    with TritonServer(params.serve, repository) as server:   # start() + wait_ready()
        print(server.grpc_url)
    # stop() on exit: SIGTERM, then SIGKILL after a grace period

Exposure: the server binds ``serve.host`` (127.0.0.1 by default, also for metrics; 0.0.0.0 only
in the Kubernetes manifests, behind a Service). Only Triton's inference, health and metadata
APIs are open. Model config and statistics need the *read key* header (``radsynth-read-key``:
``$RADSYNTH_TRITON_READ_KEY``, else ``triton-read.key`` beside the model repository, created
once with mode 0600; radsynth's client sends it). Shared memory, model repository, trace and
logging need an *admin key* that is random per start unless ``$RADSYNTH_TRITON_ADMIN_KEY`` is
set; it is put in the environment of the process that started the server and written (mode
0600, replaced at each start) to ``triton-admin.key`` beside the model repository, where
``radsynth deploy`` (which loads and unloads models) reads it. No other user can register a
shared-memory region, load or unload a model, or change the server's settings.
(Triton takes the keys on its command line, so local users can read them with ``ps``: they
gate APIs on a host you trust; on a cluster the pod is the boundary.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from radsynth.config import ServeConfig
from radsynth.errors import RadsynthError


class ServerError(RadsynthError):
    """tritonserver could not be found, started, or did not become ready."""


READ_KEY_ENV = "RADSYNTH_TRITON_READ_KEY"      # key of the model-config / statistics APIs (clients send it)
ADMIN_KEY_ENV = "RADSYNTH_TRITON_ADMIN_KEY"    # key of shared-memory / repository / trace / logging (random if unset)
READ_KEY_HEADER = "radsynth-read-key"
ADMIN_KEY_HEADER = "radsynth-admin-key"
READ_APIS = ("model-config", "statistics")
ADMIN_APIS = ("shared-memory", "model-repository", "trace", "logging")
OPEN_APIS = ("health", "metadata", "inference")


def read_key_file(cfg: ServeConfig) -> Path:
    """Where ``radsynth serve`` keeps the read key: beside the model repository."""
    return Path(cfg.repository).resolve().parent / "triton-read.key"


def admin_key_file(cfg: ServeConfig) -> Path:
    """Where ``radsynth serve`` writes the admin key of the running server (for ``radsynth deploy``)."""
    return Path(cfg.repository).resolve().parent / "triton-admin.key"


def admin_key(cfg: ServeConfig) -> str:
    """The admin key: ``$RADSYNTH_TRITON_ADMIN_KEY``, else the running server's key file; "" if none."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if key:
        return key
    try:
        return admin_key_file(cfg).read_text().strip()
    except OSError:
        return ""


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def read_key(cfg: ServeConfig, create: bool = False) -> str:
    """The read key: ``$RADSYNTH_TRITON_READ_KEY``, else the key file (created 0600 when ``create``); "" if none."""
    key = os.environ.get(READ_KEY_ENV, "").strip()
    if key:
        return key
    path = read_key_file(cfg)
    if not path.is_file() and create:
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24) + "\n")
        except FileExistsError:
            pass
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def restricted_api_flags(read: str, admin: str) -> list[str]:
    """tritonserver flags that leave only inference, health and metadata open (gRPC and HTTP)."""
    flags = []
    for apis, header, key in ((READ_APIS, READ_KEY_HEADER, read), (ADMIN_APIS, ADMIN_KEY_HEADER, admin)):
        flags.append(f"--grpc-restricted-protocol={','.join(apis)}:{header}={key}")
        flags.append(f"--http-restricted-api={','.join(apis)}:{header}={key}")
    return flags


def find_tritonserver() -> tuple[Path, Path | None]:
    """The tritonserver binary and, for pytriton's, its distribution folder.

    Returns:
        ``(binary, pytriton_dist)``; ``pytriton_dist`` is None for a system install.
    """
    system = shutil.which("tritonserver")
    if system:
        return Path(system), None
    try:
        import pytriton
    except ImportError:
        raise ServerError("no tritonserver on PATH and nvidia-pytriton is not installed; use the NGC Triton image or `pip install nvidia-pytriton`") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"{binary}: missing from nvidia-pytriton; reinstall it")
    return binary, dist


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The stub embeds an *isolated* interpreter (PYTHONPATH is ignored): model.py puts the paths
# in this variable first on sys.path before importing numpy / onnxruntime.
PYTHONPATH_ENV = "RADSYNTH_TRITON_PYTHONPATH"


def _prepare_backends(dist: Path, workdir: Path) -> Path:
    """A backends folder with the python backend and the stub for this Python."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {version} ({stub})")
    python_dir = workdir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python_dir / item.name)
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return workdir / "backends"


def _server_env(dist: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if dist is not None:
        libs = [str(Path(sys.base_prefix) / "lib"), str(dist.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
        # The stub's isolated interpreter finds its standard library from the first `python3`
        # on PATH: make that this Python's base install, matching the libpython loaded above.
        env["PATH"] = os.pathsep.join([str(Path(sys.base_prefix) / "bin"), env.get("PATH", "")])
    env[PYTHONPATH_ENV] = os.pathsep.join(p for p in site.getsitepackages() if Path(p).is_dir())
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


MODEL_CONTROL = ("explicit", "poll", "none")


def model_control_flags(cfg: ServeConfig) -> list[str]:
    """tritonserver flags for ``serve.model_control``.

    ``explicit`` loads every model of the repository at start and accepts load/unload calls
    (``radsynth deploy`` swaps a promoted version in without a restart); ``poll`` rescans the
    repository every ``serve.repository_poll_s`` seconds; ``none`` loads once (Triton's default).
    """
    if cfg.model_control == "explicit":
        return ["--model-control-mode=explicit", "--load-model=*"]
    if cfg.model_control == "poll":
        return ["--model-control-mode=poll", f"--repository-poll-secs={max(1, int(cfg.repository_poll_s))}"]
    if cfg.model_control == "none":
        return []
    raise ServerError(f"serve.model_control {cfg.model_control!r}: use one of {', '.join(MODEL_CONTROL)}")


def _die_with_parent() -> None:  # runs in the child before exec (Linux only)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """A tritonserver child process bound to the ports in ``cfg``.

    Args:
        cfg: ``params.serve`` (host, ports, ready timeout, log level).
        repository: the model repository (see ``serving.repository.build_repository``).
        log_path: tritonserver's stdout+stderr go here (default: a temp file).
    """

    def __init__(self, cfg: ServeConfig, repository: str | Path, log_path: str | Path | None = None):
        self.cfg = cfg
        self.repository = Path(repository).resolve()
        self._workdir = Path(tempfile.mkdtemp(prefix="radsynth-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        import secrets

        self.read_key = read_key(cfg, create=True)
        self._admin_key = os.environ.get(ADMIN_KEY_ENV, "").strip()
        if not self._admin_key:
            self._admin_key = secrets.token_urlsafe(24)
            _write_private(admin_key_file(cfg), self._admin_key)  # for `radsynth deploy` as the same user
        # Clients of the process that started the server (tests, benchmarks, `radsynth serve` itself)
        # send both keys.
        os.environ.setdefault(READ_KEY_ENV, self.read_key)
        os.environ.setdefault(ADMIN_KEY_ENV, self._admin_key)

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.cfg.host in ("0.0.0.0", "") else self.cfg.host

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.cfg.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.cfg.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.cfg.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The tritonserver command line."""
        binary, dist = find_tritonserver()
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.cfg.host}", f"--http-port={self.cfg.http_port}",
            f"--grpc-address={self.cfg.host}", f"--grpc-port={self.cfg.grpc_port}",
            "--allow-metrics=true", "--allow-cpu-metrics=true",
            f"--metrics-address={self.cfg.host}", f"--metrics-port={self.cfg.metrics_port}",
            "--exit-on-error=true", "--strict-readiness=true", "--disable-auto-complete-config",
            f"--log-verbose={self.cfg.log_verbose}",
            *restricted_api_flags(self.read_key, self._admin_key),
            *model_control_flags(self.cfg),
        ]
        if dist is not None:
            cmd.append(f"--backend-directory={_prepare_backends(dist, self._workdir)}")
            cmd.append(f"--cache-directory={dist / 'caches'}")
        return cmd

    def start(self) -> "TritonServer":
        """Launch tritonserver (does not wait; see :meth:`wait_ready`)."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not (self.repository / "").is_dir():
            raise ServerError(f"{self.repository}: model repository not found; build it with `radsynth serve --build-only`")
        for port in (self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port):
            with socket.socket() as sock:
                if sock.connect_ex((self._client_host, port)) == 0:
                    raise ServerError(f"port {port} on {self._client_host} is already in use; stop that server or change serve.*_port")
        _, dist = find_tritonserver()
        cmd = self.command()
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=_server_env(dist),
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        return self

    def is_ready(self) -> bool:
        """True when the server answers ``/v2/health/ready`` with 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float | None = None) -> "TritonServer":
        """Block until ready; raise with the log's tail if it exits or times out."""
        timeout_s = self.cfg.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(f"tritonserver exited (code {code}) before it was ready:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s (serve.ready_timeout_s):\n{self.log_tail()}")

    def log_tail(self, lines: int = 12) -> str:
        """The log's error lines (model load failures) and its last ``lines`` lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line[:2000] for line in text if line.startswith("E") and "CudaDriverHelper" not in line][-4:]
        return "\n".join(errors + ["..."] + text[-lines:] + [f"(full log: {self.log_path})"])

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace_s`` for in-flight requests, then SIGKILL. Returns the exit code."""
        proc, self.process = self.process, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        shutil.rmtree(self._workdir / "backends", ignore_errors=True)  # the log stays for log_tail()
        return code

    def __enter__(self) -> "TritonServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(server: TritonServer) -> int:
    """Run until Ctrl-C / SIGTERM or until tritonserver exits; always stop it cleanly.

    Returns:
        0 after a requested shutdown, else tritonserver's exit code.
    """
    stop_requested = False

    def request_stop(signum, _frame):
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_requested:
            if server.process is None or server.process.poll() is not None:
                code = server.process.returncode if server.process else 1
                print(f"tritonserver exited (code {code}); last log lines:\n{server.log_tail()}", file=sys.stderr)
                return code or 1
            time.sleep(0.2)
        print("stopping tritonserver ...", file=sys.stderr)
        code = server.stop()
        print(f"tritonserver stopped (code {code})", file=sys.stderr)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------
# `radsynth serve`
# --------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--repository", default=None, help="model repository folder (default: serve.repository)")
    parser.add_argument("--onnx", action="append", default=[], metavar="[NAME=]PATH",
                        help="serve a local ONNX file instead of the registry (NAME defaults to registry.model_name; repeatable)")
    parser.add_argument("--alias", action="append", default=[], help="registry alias(es) to serve (default: serve.aliases, i.e. registry.champion_alias)")
    parser.add_argument("--flavour", choices=("cpu", "gpu"), default=None, help="cpu: python backend + onnxruntime; gpu: onnxruntime_onnx (NGC image)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--build-only", action="store_true", help="build the model repository and exit")
    group.add_argument("--no-build", action="store_true", help="serve the existing repository as it is")


def serve_params(params, args):
    """``params`` with the command line's serve overrides applied."""
    import dataclasses

    cfg = params.serve
    onnx = dict(cfg.onnx)
    models = list(cfg.models)
    for item in args.onnx:
        name, path = item.split("=", 1) if "=" in item and not Path(item).exists() else (params.registry.model_name, item)
        onnx[name] = path
        if name not in models:
            models.append(name)
    cfg = dataclasses.replace(
        cfg, onnx=onnx, models=tuple(models), aliases=tuple(args.alias) or cfg.aliases,
        flavour=args.flavour or cfg.flavour, repository=args.repository or cfg.repository,
    )
    return dataclasses.replace(params, serve=cfg)


def run(args) -> int:
    from radsynth.cli import load_cli_params
    from serving.repository import build_repository

    params = serve_params(load_cli_params(args), args)
    cfg = params.serve
    if not args.no_build:
        repo = build_repository(params)
        index = json.loads((repo / "repository.json").read_text())
        models = ", ".join(f"{name} v{','.join(map(str, versions))}" for name, versions in index["models"].items())
        print(f"model repository {repo} ({cfg.flavour} flavour): {models}", file=sys.stderr)
    if args.build_only:
        return 0
    _, dist = find_tritonserver()
    if cfg.flavour == "gpu" and dist is not None:
        raise ServerError("the gpu flavour needs Triton's onnxruntime backend (NGC tritonserver image); "
                          "here use --flavour cpu, or --build-only and deploy the repository there")
    server = TritonServer(cfg, cfg.repository, log_path=Path(cfg.repository).parent / "tritonserver.log")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    print(f"tritonserver ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  metrics {server.metrics_url}  "
          f"(log {server.log_path}); Ctrl-C to stop", file=sys.stderr)
    return serve_forever(server)
