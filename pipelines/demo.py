"""``make demo``: the whole job on the sample export, then Triton and the web app, until Ctrl-C.

Steps (each prints what it does; long ones show their own progress bars):

1. ``dvc repro`` on the profile (default ``cpu``): ingest -> preprocess -> validate -> train ->
   evaluate (gate) -> export -> register. Stages whose inputs did not change are skipped, so
   a second ``make demo`` reuses what is done.
2. ``radsynth promote``: ``champion`` moves to the new version when its gate passed; when the
   gate failed, a plain message says which checks failed and the previous champion (if any)
   stays in service.
3. ``radsynth serve`` (Triton on the ``champion``), the MLflow UI, and ``radsynth web``; their
   URLs are printed once each answers.
4. Supervision until Ctrl-C: a service that exits is started again after a backoff (1 s, doubling
   to 30 s while it keeps failing; back to 1 s once it has run for a minute), and the others keep
   running. A crashed Triton comes back on the model repository it already built (``--no-build``)
   while the web app shows its 503 page; the web app and the MLflow UI are never torn down with it.
5. Ctrl-C (or SIGTERM) stops every process this script started, newest first.

Run from the project root: ``.venv/bin/python -m pipelines.demo [--profile cpu] [--no-serve]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import threading

from radsynth.config import Params, load_params
from radsynth.errors import RadsynthError

MLFLOW_UI_PORT = 5000
MLFLOW_SCRIPT = Path("mlflow") / "start-server.sh"
BACKOFF_FIRST_S = 1.0                          # first restart delay of a service that exited
BACKOFF_MAX_S = 30.0                           # the delay doubles up to this while it keeps failing
STABLE_S = 60.0                                # a service that ran this long starts again from BACKOFF_FIRST_S


@dataclasses.dataclass
class Service:
    """A long-running child the demo keeps alive."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    restart_argv: list[str] | None = None      # how to start it again (e.g. Triton without rebuilding); default argv
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0                          # exits in a row without a stable run
    restart_at: float | None = None            # when the next start is due (None: running)

    def backoff_s(self) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(self.failures - 1, 0))


class Demo:
    """Starts child processes in their own process groups and stops them all on exit."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.children: list[tuple[str, subprocess.Popen]] = []

    def run(self, what: str, argv: Sequence[str]) -> int:
        """Run a command to completion in the foreground (its output goes to the terminal)."""
        print(f"\n==> {what}: {' '.join(argv)}", flush=True)
        return subprocess.run(list(argv), env=self.env).returncode

    def start(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running service (``env`` added to the demo's); its output goes to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"==> starting {name}: {' '.join(argv)}  (log: {log})", flush=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(list(argv), env={**self.env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.children.append((name, proc))
        return proc

    def launch(self, service: Service, restart: bool = False) -> subprocess.Popen:
        """Start (or start again) ``service``; the process replaces its old one in :attr:`children`."""
        argv = service.restart_argv if restart and service.restart_argv else service.argv
        if service.proc is not None:
            self.children = [(n, p) for n, p in self.children if p is not service.proc]
        service.proc = self.start(service.name, argv, service.log, env=service.env)
        service.started_at, service.restart_at = time.monotonic(), None
        return service.proc

    def supervise_once(self, services: Sequence[Service]) -> None:
        """One supervision pass: note exits, schedule restarts with backoff, start what is due."""
        now = time.monotonic()
        for service in services:
            proc = service.proc
            if service.restart_at is None and proc is not None and proc.poll() is not None:
                ran = now - service.started_at
                service.failures = 1 if ran >= STABLE_S else service.failures + 1
                service.restart_at = now + service.backoff_s()
                print(f"{service.name} exited with status {proc.returncode} after {ran:.0f} s; starting it again in "
                      f"{service.backoff_s():.0f} s (the other services keep running; log: {service.log})", flush=True)
            elif service.restart_at is not None and now >= service.restart_at:
                print(f"starting {service.name} again (restart {service.failures})", flush=True)
                self.launch(service, restart=True)

    def supervise(self, services: Sequence[Service], stop: "threading.Event | None" = None, poll_s: float = 0.2) -> None:
        """Keep ``services`` running until ``stop`` is set (or Ctrl-C)."""
        while stop is None or not stop.is_set():
            self.supervise_once(services)
            time.sleep(poll_s)

    def stop(self) -> None:
        """SIGTERM every child's process group (newest first), SIGKILL what is left after 15 s."""
        for name, proc in reversed(self.children):
            if proc.poll() is None:
                print(f"stopping {name}", flush=True)
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
        self.children.clear()


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``); a
    group that is already gone is not an error."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, name: str, log: Path) -> None:
    """Poll ``url`` until it answers 2xx; fail early when ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RadsynthError(f"{name} exited with status {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RadsynthError(f"{name} did not answer at {url} within {timeout_s:.0f} s; see {log}")


def dvc_profile(path: str | os.PathLike = "params.yaml") -> str:
    """The profile DVC stages use: the ``profile:`` key of params.yaml."""
    import yaml

    return str((yaml.safe_load(Path(path).read_text()) or {}).get("profile", "cpu"))


def gate_report(params: Params) -> tuple[bool | None, str]:
    """The gate verdict and a one-paragraph reason from ``<artifacts>/evaluate/gate.json``."""
    path = Path(params.paths.artifacts) / "evaluate" / "gate.json"
    if not path.is_file():
        return None, "no gate report"
    gate = json.loads(path.read_text())
    details = [c.get("detail", c.get("name")) for c in gate.get("checks") or [] if isinstance(c, dict) and not c.get("passed")]
    failed = details or gate.get("failed") or []
    lines = [str(f.get("detail", f)) if isinstance(f, dict) else str(f) for f in failed]
    return bool(gate.get("passed")), "; ".join(lines) or "all checks passed"


def gate_level_note(params: Params) -> str:
    """How the verdict reads: its level and, below release, how far from release (gate.json)."""
    path = Path(params.paths.artifacts) / "evaluate" / "gate.json"
    if not path.is_file():
        return ""
    gate = json.loads(path.read_text())
    level = gate.get("level", "release")
    if level == "release":
        return "judged at release level"
    units = ", ".join(f"{c} {d['units']:.3g} (release limit {d['limits']['release']:g})"
                      for c, d in (gate.get("distances") or {}).items() if d.get("units") is not None)
    return (f"judged at {level} level; release level {'passed' if gate.get('release_passed') else 'NOT reached'}"
            + (f" (domain FID in reference units: {units})" if units else ""))


def has_alias(params: Params, model: str, alias: str) -> bool:
    """Whether registered model ``model`` has ``alias`` in the configured registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from radsynth.tracking import setup_mlflow

    setup_mlflow(params)
    try:
        MlflowClient().get_model_version_by_alias(model, alias)
        return True
    except MlflowException:
        return False


def serve_command(params: Params) -> list[str]:
    """``radsynth serve`` for the demo: the champion generator plus, when they have a champion,
    the domain classifier (the web page shows its confidence) and the encoder trained for that
    generator (the web page maps an upload to z with it); promotion moves all three together."""
    argv = ["radsynth", "serve", "--profile", params.profile]
    models = list(params.serve.models)
    for name in (params.registry.classifier_name, params.registry.encoder_name):
        if name not in models and has_alias(params, name, params.registry.champion_alias):
            models.append(name)
    if models != list(params.serve.models):
        argv += ["--set", "serve.models=[" + ", ".join(models) + "]"]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), help="params profile (default cpu, or $PROFILE)")
    parser.add_argument("--no-serve", action="store_true", help="stop after training, registration and promotion")
    args = parser.parse_args(argv)

    params = load_params(profile=args.profile)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RADSYNTH_PROFILE": params.profile,
           "PYTHONUNBUFFERED": "1", "GX_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path.cwd()), os.environ.get("PYTHONPATH", "")) if p)
    logs = Path(params.paths.artifacts) / "demo"
    demo = Demo(env)
    started = time.monotonic()

    def on_term(signum, frame):  # SIGTERM behaves like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    try:
        # dvc.yaml takes the profile from params.yaml's `profile:` key, so DVC reruns what a
        # profile switch changes; a different --profile must be selected there.
        selected = dvc_profile()
        if params.profile != selected:
            raise RadsynthError(f"params.yaml selects profile {selected!r}; set `profile: {params.profile}` there "
                                "(DVC stages take the profile from params.yaml so that they rerun when it changes)")
        status = demo.run(f"pipeline on the {params.profile} profile (finished stages are reused)", ["dvc", "repro"])
        passed, reason = gate_report(params)
        if status != 0:
            print(f"\nthe pipeline stopped with status {status} (its message is above)", file=sys.stderr)
            return status
        if passed is False:
            # A failed gate is a recorded result: dvc repro finished, export/encoder/register refused.
            print(f"\nThe evaluation gate FAILED ({gate_level_note(params)}), so this model was not exported, registered "
                  f"or promoted. Failed checks: {reason}.\n"
                  f"Full report: {Path(params.paths.artifacts) / 'evaluate' / 'gate.md'}", flush=True)
        else:
            print(f"\npipeline done in {time.monotonic() - started:.0f} s; gate passed, {gate_level_note(params)}", flush=True)
            if demo.run("promote the new version to champion", ["radsynth", "promote", "--profile", params.profile]) != 0:
                print("promotion refused (reason above); the previous champion, if any, stays in service", flush=True)
        if args.no_serve:
            return 0

        if not has_alias(params, params.registry.model_name, params.registry.champion_alias):
            print(f"nothing to serve: {params.registry.model_name} has no @{params.registry.champion_alias} yet "
                  "(fix what the gate report says and run `make demo` again)", flush=True)
            return 0 if passed is False else 1
        serve, web = params.serve, params.web
        triton_log, web_log, mlflow_log = logs / "triton.log", logs / "web.log", logs / "mlflow.log"
        argv = serve_command(params)
        triton = Service("Triton", argv, triton_log, restart_argv=argv + ["--no-build"])
        services = [triton]
        demo.launch(triton)
        mlflow_ui = None
        if params.paths.mlflow_uri.startswith("sqlite:///") and MLFLOW_SCRIPT.is_file():
            # The UI over the same SQLite registry the pipeline wrote (a server URI needs none).
            mlflow_env = {"MLFLOW_BACKEND_STORE_URI": params.paths.mlflow_uri,
                          "MLFLOW_ARTIFACTS_DESTINATION": str(Path(params.paths.mlflow_artifacts).resolve()),
                          "MLFLOW_PORT": str(MLFLOW_UI_PORT), "MLFLOW_WORKERS": "1"}
            mlflow_ui = Service("MLflow UI", ["sh", str(MLFLOW_SCRIPT)], mlflow_log, env=mlflow_env)
            demo.launch(mlflow_ui)
        wait_http(f"http://{serve.host}:{serve.http_port}/v2/health/ready", triton.proc, serve.ready_timeout_s, "Triton", triton_log)
        web_app = Service("web app", ["radsynth", "web", "--profile", params.profile], web_log)
        demo.launch(web_app)
        services.append(web_app)
        wait_http(f"http://{web.host}:{web.port}/", web_app.proc, 120, "web app", web_log)
        if mlflow_ui is not None:
            try:
                wait_http(f"http://127.0.0.1:{MLFLOW_UI_PORT}/health", mlflow_ui.proc, 60, "MLflow UI", mlflow_log)
                services.append(mlflow_ui)
            except RadsynthError as exc:
                print(f"(MLflow UI not available: {exc})", flush=True)
                mlflow_ui = None

        print("\n" + "=" * 72)
        print(f"radsynth is up ({time.monotonic() - started:.0f} s):")
        print(f"  web app        http://{web.host}:{web.port}/")
        print(f"  Triton gRPC    {serve.host}:{serve.grpc_port}   HTTP http://{serve.host}:{serve.http_port}   "
              f"metrics http://{serve.host}:{serve.metrics_port}/metrics")
        if mlflow_ui is not None:
            print(f"  MLflow UI      http://127.0.0.1:{MLFLOW_UI_PORT}/")
        print(f"  try:           radsynth generate --condition <NAME> -n 4 --seed 7 --out artifacts/demo/samples")
        print("Press Ctrl-C to stop everything. A service that exits is started again.")
        print("=" * 72, flush=True)
        demo.supervise(services)
    except KeyboardInterrupt:
        print("\nCtrl-C: stopping", flush=True)
        return 0
    except RadsynthError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
