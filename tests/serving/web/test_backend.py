"""The web app's backend with its dependencies slow or gone: a real tritonserver and a real MLflow
server, each stopped (or replaced by a socket that accepts and never answers) under the app."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.web.app import create_app
from serving.web.backend import ServiceUnavailable, TritonBackend
from tests.serving.conftest import MODEL

ROOT = Path(__file__).resolve().parents[3]


class Blackhole:
    """A TCP port that accepts connections and never answers (a hung dependency); counts accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    def close(self):
        self._stop = True
        self.thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _web_params(base, **web):
    return dataclasses.replace(base, web=dataclasses.replace(base.web, **web))


def _timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


@pytest.fixture
def web_params(registry_params, triton, tmp_path):
    params = _web_params(registry_params, triton_url=triton.grpc_url, audit_log=str(tmp_path / "audit.jsonl"),
                         model_info_ttl_s=0.5, registry_timeout_s=1.0, health_timeout_s=0.5)
    return params


# --- the generator version the page names is the one that answers -----------------------------


def test_generation_is_pinned_to_the_page_version_and_checked(web_params):
    backend = TritonBackend(web_params)
    backend.begin_request(30)
    info = backend.model_info()
    assert info.version == "1" and info.registry_version == "1"
    z = np.zeros((2, info.z_dim), np.float32)
    out = backend.generate(z, np.zeros(2, np.int64))
    assert out.shape == (2, info.img_channels, info.img_resolution, info.img_resolution)
    backend._local.version = "7"  # a page that names a version the server does not serve
    with pytest.raises(ServiceUnavailable, match="version 7 of the generator"):
        backend.generate(z, np.zeros(2, np.int64))


def test_a_response_from_another_version_is_refused():
    """The client's check, on a real tritonclient result object that says version 3."""
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2

    from serving.client import Client, ClientError

    response = service_pb2.ModelInferResponse(model_name=MODEL, model_version="3")
    client = Client("127.0.0.1:1", model_version="2")
    with pytest.raises(ClientError, match="asked for version 2, the server answered with version 3"):
        client._check_version(tc.InferResult(response))
    client.model_version = "3"
    client._check_version(tc.InferResult(response))


# --- MLflow slow or gone --------------------------------------------------------------------


@pytest.fixture
def mlflow_server(registry_params, tmp_path):
    """A real `mlflow server` over the session registry's SQLite store; yields (url, process)."""
    port = _free_port()
    db = registry_params.paths.mlflow_uri
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the venv's mlflow
           "MLFLOW_BACKEND_STORE_URI": db, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_ARTIFACTS_DESTINATION": str(Path(registry_params.paths.mlflow_artifacts).resolve())}
    proc = subprocess.Popen(["sh", str(ROOT / "mlflow" / "start-server.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # a loaded 2-core machine can take minutes
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError("mlflow server did not start")
            time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_mlflow_stopped_keeps_the_last_facts_and_the_page_up(web_params, mlflow_server):
    url, proc = mlflow_server
    params = dataclasses.replace(web_params, paths=dataclasses.replace(web_params.paths, mlflow_uri=url))
    backend = TritonBackend(params)
    client = create_app(params, backend=backend).test_client()
    assert client.get("/").status_code == 200
    deadline = time.monotonic() + 30
    while backend._registry is None or backend._registry.version is None:  # the first read runs in the background
        assert time.monotonic() < deadline
        client.get("/")
        time.sleep(0.1)
    assert backend.model_info().registry_version == "1"
    os.killpg(proc.pid, 9)  # MLflow gone (only the server this test started)
    proc.wait(10)
    time.sleep(0.6)  # past web.model_info_ttl_s: the next request starts a refresh that fails
    for _ in range(3):
        resp, took = _timed(lambda: client.get("/"))
        assert resp.status_code == 200 and took < 1.0
        time.sleep(1.2)
    info = backend.model_info()
    assert info.registry_version == "1" and info.metrics is not None
    assert "showing facts read" in (info.registry_note or "")  # stale, and the page says so
    health, took = _timed(lambda: client.get("/healthz"))
    assert health.status_code == 200 and took < 1.0


def test_mlflow_hanging_costs_one_refresh_at_a_time_and_healthz_answers(web_params):
    hole = Blackhole()
    try:
        params = dataclasses.replace(web_params, paths=dataclasses.replace(web_params.paths, mlflow_uri=f"http://127.0.0.1:{hole.port}"))
        params = _web_params(params, model_info_ttl_s=60.0)  # one refresh period covers the whole test
        backend = TritonBackend(params)
        app = create_app(params, backend=backend)
        results = []

        def user():
            c = app.test_client()
            for _ in range(3):
                resp, took = _timed(lambda: c.get("/"))
                results.append((resp.status_code, took))

        threads = [threading.Thread(target=user) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert {s for s, _ in results} == {200}
        assert max(t for _, t in results) < 2.5  # at most the first-read wait (1 s) plus the page, never MLflow's 120 s
        assert len(hole.accepted) == 1  # 24 pages, one registry refresh (one connection: no retries, no pile-up)
        health, took = _timed(lambda: app.test_client().get("/healthz"))
        assert health.status_code == 200 and took < 1.0
        condition = backend.model_info().classes[0]
        page = app.test_client().get(f"/result?condition={condition}&seed=1&n=1")  # the metrics panel says why they are missing
        assert page.status_code == 200
        import re

        note = re.search(r'id="registry-note">(.*?)</p>', page.get_data(as_text=True), re.S)
        # still hanging ("not loaded yet") or timed out after web.registry_timeout_s ("unavailable"): either way it says so
        assert note and ("are not loaded yet" in note.group(1) or "are unavailable" in note.group(1)), note and note.group(1)
    finally:
        hole.close()


# --- Triton slow or gone --------------------------------------------------------------------


def test_triton_hanging_gives_503_within_a_second(web_params):
    hole = Blackhole()
    try:
        params = _web_params(web_params, triton_url=f"127.0.0.1:{hole.port}")
        client = create_app(params, backend=TritonBackend(params)).test_client()
        for path in ("/", "/healthz"):
            resp, took = _timed(lambda: client.get(path))
            assert resp.status_code == 503 and took < 1.0, (path, took)
    finally:
        hole.close()


@pytest.mark.slow
def test_triton_stopped_and_restarted_503_then_200(registry_params, tmp_path):
    """A tritonserver of this test's own: up (200), stopped (503 within 1 s, page and /healthz),
    started again on the same ports (200 again, no restart of the app)."""
    from serving.repository import build_repository
    from serving.server import TritonServer, free_port

    serve = dataclasses.replace(registry_params.serve, http_port=free_port(), grpc_port=free_port(),
                                metrics_port=free_port(), repository=str(tmp_path / "repo"))
    params = dataclasses.replace(registry_params, serve=serve)
    repo = build_repository(params)
    server = TritonServer(serve, repo).start().wait_ready(90)
    params = _web_params(params, triton_url=server.grpc_url, model_info_ttl_s=30.0, health_timeout_s=0.5)
    client = create_app(params, backend=TritonBackend(params)).test_client()
    try:
        assert client.get("/").status_code == 200
        server.stop()
        for path in ("/", "/healthz", "/result?condition=NORMAL&seed=1&n=1"):
            resp, took = _timed(lambda: client.get(path))
            assert resp.status_code == 503 and took < 1.0, (path, took)
        server = TritonServer(serve, repo).start().wait_ready(90)
        back = None
        for _ in range(100):
            if client.get("/").status_code == 200:
                back = True
                break
            time.sleep(0.1)
        assert back
        assert client.get("/result?condition=NORMAL&seed=1&n=1").status_code == 200
    finally:
        server.stop()


def test_request_deadline_stops_a_slow_request(web_params):
    backend = TritonBackend(web_params)
    backend.begin_request(0.01)
    time.sleep(0.05)
    with pytest.raises(ServiceUnavailable, match="deadline"):
        backend.model_info()
