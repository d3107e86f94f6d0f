"""make demo's driver: process handling and the gate message (the full demo runs in `make demo`)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pipelines.demo import Demo, dvc_profile, gate_report, wait_http
from radsynth.config import load_params, parse_override
from radsynth.errors import RadsynthError

ROOT = Path(__file__).resolve().parents[2]


def test_stop_ends_every_child_and_its_children(tmp_path):
    demo = Demo(dict(os.environ))
    # a child that starts a grandchild: both must be gone after stop()
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    proc = demo.start("sleeper", [sys.executable, "-c", script], tmp_path / "log.txt")
    time.sleep(0.5)
    pgid = os.getpgid(proc.pid)
    demo.stop()
    assert proc.poll() is not None and demo.children == []
    time.sleep(0.5)
    assert live_members(pgid) == []


def live_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not zombies."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_wait_http_fails_early_when_the_service_dies(tmp_path):
    demo = Demo(dict(os.environ))
    proc = demo.start("dies", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")
    started = time.monotonic()
    with pytest.raises(RadsynthError, match="dies exited with status 3"):
        wait_http("http://127.0.0.1:9/", proc, 60, "dies", tmp_path / "log.txt")
    assert time.monotonic() - started < 30
    demo.stop()


def test_gate_report_reads_the_verdict(tmp_path):
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides={"paths.artifacts": str(tmp_path)})
    assert gate_report(params) == (None, "no gate report")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "gate.json").write_text(json.dumps(
        {"passed": False, "failed": [{"detail": "cond_acc/NORMAL 0.31 < 0.5"}, {"detail": "memorisation_share 0.2 > 0.05"}]}))
    assert gate_report(params) == (False, "cond_acc/NORMAL 0.31 < 0.5; memorisation_share 0.2 > 0.05")


def test_dvc_profile_is_the_params_key(tmp_path):
    assert dvc_profile(ROOT / "params.yaml") == "cpu"          # make demo's default
    (tmp_path / "params.yaml").write_text("profile: tiny\n")
    assert dvc_profile(tmp_path / "params.yaml") == "tiny"


def test_backoff_doubles_while_failing_and_resets_after_a_stable_run(tmp_path):
    from pipelines.demo import BACKOFF_MAX_S, Service

    service = Service("x", ["true"], tmp_path / "log")
    delays = []
    for failures in range(1, 9):
        service.failures = failures
        delays.append(service.backoff_s())
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0] and delays[-1] == BACKOFF_MAX_S


def test_a_service_that_exits_is_restarted_and_the_others_keep_running(tmp_path):
    import threading

    from pipelines.demo import Service

    demo = Demo(dict(os.environ))
    flaky = Service("flaky", [sys.executable, "-c", "import time; time.sleep(0.3)"], tmp_path / "flaky.log")
    steady = Service("steady", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "steady.log")
    demo.launch(flaky)
    demo.launch(steady)
    steady_pid = steady.proc.pid
    stop = threading.Event()
    watcher = threading.Thread(target=demo.supervise, args=([flaky, steady], stop, 0.05))
    watcher.start()
    try:
        deadline = time.monotonic() + 30
        while flaky.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flaky.failures >= 3  # exited, restarted after 1 s, exited, restarted after 2 s, ...
        assert steady.proc.pid == steady_pid and steady.proc.poll() is None
    finally:
        stop.set()
        watcher.join()
        demo.stop()
    assert flaky.proc.poll() is not None and steady.proc.poll() is not None


@pytest.mark.slow
def test_kill_9_of_tritonserver_gives_503_then_200_and_spares_web_and_mlflow(tmp_path):
    """The issue's check, on a real stack: the demo's supervisor, `radsynth serve` (tritonserver),
    `radsynth web` (gunicorn) and the MLflow UI; tritonserver is killed with SIGKILL."""
    import dataclasses
    import signal
    import threading
    import urllib.error
    import urllib.request

    import psutil

    from pipelines.demo import MLFLOW_SCRIPT, Service
    from serving.repository import build_repository
    from serving.server import free_port
    from tests.serving.tiny import make_generator

    http, grpc, metrics, web_port, ui_port = (free_port() for _ in range(5))
    repo = tmp_path / "model_repository"
    sets = [f"serve.repository={repo}", f"serve.http_port={http}", f"serve.grpc_port={grpc}", f"serve.metrics_port={metrics}",
            f"web.triton_url=127.0.0.1:{grpc}", f"paths.mlflow_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            f"web.audit_log={tmp_path / 'audit.jsonl'}", "serve.ready_timeout_s=90"]
    params = load_params(ROOT / "params.yaml", profile="tiny", overrides=dict(parse_override(s) for s in sets))
    _, onnx = make_generator(tmp_path / "generator.onnx", params)
    build_repository(dataclasses.replace(params, serve=dataclasses.replace(params.serve, onnx={"radsynth-generator": str(onnx)})))
    flags = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RADSYNTH_WEB_SECRET": "demo-test",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # as pipelines/demo.py: the venv's mlflow
    env.pop("MLFLOW_TRACKING_URI", None)
    demo = Demo(env)
    cli = [sys.executable, "-m", "radsynth.cli"]
    triton = Service("Triton", cli + ["serve", "--profile", "tiny", "--no-build", *flags], tmp_path / "triton.log")
    web = Service("web app", cli + ["web", "--profile", "tiny", "--port", str(web_port), "--workers", "1", *flags], tmp_path / "web.log")
    ui = Service("MLflow UI", ["sh", str(ROOT / MLFLOW_SCRIPT)], tmp_path / "mlflow.log",
                 env={"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'ui.db'}", "MLFLOW_PORT": str(ui_port),
                      "MLFLOW_WORKERS": "1", "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "ui-artifacts")})
    services = [triton, web, ui]
    stop = threading.Event()
    watcher = threading.Thread(target=demo.supervise, args=(services, stop, 0.1))

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    page = f"http://127.0.0.1:{web_port}/"
    try:
        for service in services:
            demo.launch(service)
        wait_http(f"http://127.0.0.1:{http}/v2/health/ready", triton.proc, 120, "Triton", triton.log)
        wait_http(page, web.proc, 120, "web app", web.log)
        wait_http(f"http://127.0.0.1:{ui_port}/health", ui.proc, 120, "MLflow UI", ui.log)
        watcher.start()
        web_pid, ui_pid = web.proc.pid, ui.proc.pid
        [server] = [p for p in psutil.Process(triton.proc.pid).children(recursive=True) if p.name() == "tritonserver"]
        os.kill(server.pid, signal.SIGKILL)  # only the server this test started
        killed = time.monotonic()
        codes = []
        while time.monotonic() - killed < 60:
            codes.append((time.monotonic() - killed, status(page)))
            if codes[-1][1] == 200 and any(c == 503 for _, c in codes):
                break
            time.sleep(0.05)
        first_503 = next(t for t, c in codes if c == 503)
        back = next(t for t, c in codes if c == 200 and t > first_503)
        assert first_503 <= 1.0, codes[:10]
        assert back <= 30.0, codes[-5:]
        assert all(c in (200, 503) for _, c in codes), sorted({c for _, c in codes})  # never a refused connection
        assert web.proc.pid == web_pid and web.proc.poll() is None
        assert ui.proc.pid == ui_pid and status(f"http://127.0.0.1:{ui_port}/health") == 200
        assert triton.failures == 1 and triton.proc.poll() is None
        print(f"503 after {first_503:.2f} s, 200 again after {back:.1f} s")
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        demo.stop()
