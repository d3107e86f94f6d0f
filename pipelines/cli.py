"""``radsynth pipeline compile | run-local | submit``: the Kubeflow pipeline from the command line.

- ``compile`` writes the IR YAML (default ``pipelines/radsynth_pipeline.yaml`` for the
  ``gpu`` profile: the committed file a test keeps in step with the code).
- ``run-local`` runs the whole pipeline here with kfp's SubprocessRunner (every task a
  subprocess of this Python; the project must be importable, as in the image) and prints
  the gate verdict and the registered model version.
- ``submit --host URL`` compiles for the chosen profile and starts a run on a Kubeflow
  Pipelines API (``$KFP_HOST`` or ``pipeline.host`` when ``--host`` is not given).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from radsynth.config import Params, load_params, parse_override
from radsynth.errors import RadsynthError

DEFAULT_IR = Path(__file__).resolve().parent / "radsynth_pipeline.yaml"
CLUSTER_PROFILE = "gpu"
HOST_ENV = "KFP_HOST"


@dataclass(frozen=True)
class LocalRun:
    """Outcome of a local pipeline run."""

    run_dir: Path                  # the run's folder under the pipeline root (task outputs)
    gate_passed: bool | None       # the evaluate task's verdict (None: it did not run)
    model_version: str | None      # the version the register task created (None: not run)


def compile_pipeline(params: Params, output: str | os.PathLike = DEFAULT_IR) -> Path:
    """Compile ``radsynth_pipeline`` for ``params`` to IR YAML (atomic write).

    Returns:
        The path written.
    """
    from kfp import compiler

    from pipelines.radsynth_pipeline import build_pipeline
    from radsynth.io import atomic_path

    output = Path(output)
    with atomic_path(output) as tmp:
        tmp_yaml = tmp.with_suffix(".yaml")
        compiler.Compiler().compile(build_pipeline(params), str(tmp_yaml))
        tmp_yaml.replace(tmp)
    return output


def run_local(
    params: Params,
    overrides: Sequence[str] = (),
    raw_dir: str | None = None,
    pipeline_root: str | os.PathLike | None = None,
    promote: bool = True,
) -> LocalRun:
    """Run the whole pipeline on this machine with kfp's SubprocessRunner.

    Args:
        params: resolved config (its profile is passed to every task).
        overrides: ``key=value`` strings every task applies after the profile.
        raw_dir: the export's folder (default ``paths.raw``).
        pipeline_root: where task outputs go (default ``<paths.artifacts>/kfp-local``).
        promote: move the ``champion`` alias to the new version when the gate passes.

    Returns:
        The :class:`LocalRun` summary.

    Raises:
        RadsynthError: a task failed (its log is above).
    """
    import kfp.local

    from pipelines.radsynth_pipeline import build_pipeline

    root = Path(pipeline_root or Path(params.paths.artifacts) / "kfp-local").resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(params)
    try:
        pipeline(profile=params.profile, overrides=list(overrides), raw_dir=raw_dir or params.paths.raw, promote=promote)
    except RuntimeError as exc:  # kfp.local raises RuntimeError when a task fails
        raise RadsynthError(f"local pipeline run failed: {exc} (the failing task's log is above)") from None
    new = sorted((p for p in root.iterdir() if p.name not in before and p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not new:
        raise RadsynthError(f"local pipeline run left no run folder under {root}")
    run_dir = new[-1]
    gate = _task_output(run_dir / "evaluate")
    version = _task_output(run_dir / "register")
    return LocalRun(run_dir=run_dir, gate_passed=None if gate is None else bool(gate),
                    model_version=None if version is None else str(version))


def submit(
    params: Params,
    host: str,
    overrides: Sequence[str] = (),
    raw_dir: str | None = None,
    promote: bool = True,
    run_name: str | None = None,
) -> str:
    """Compile for ``params`` and start a run on the Kubeflow Pipelines API at ``host``.

    Returns:
        The run id.

    Raises:
        RadsynthError: the host is unreachable or rejects the run.
    """
    import tempfile

    import kfp

    cfg = params.pipeline
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "radsynth_pipeline.yaml")
        arguments = {"profile": params.profile, "overrides": list(overrides), "promote": promote}
        if raw_dir:
            arguments["raw_dir"] = raw_dir
        try:
            with warnings.catch_warnings():  # kfp warns about old servers on every client
                warnings.simplefilter("ignore", FutureWarning)
                client = kfp.Client(host=host, namespace=cfg.namespace)
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name or f"radsynth-{params.profile}-{time.strftime('%Y%m%d-%H%M%S')}",
                experiment_name=cfg.experiment,
                namespace=cfg.namespace,
            )
        except Exception as exc:  # the KFP client raises urllib3, ApiException, ValueError, ...
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise RadsynthError(
                f"could not submit to Kubeflow Pipelines at {host} ({type(exc).__name__}: {reason}); "
                "check the URL (e.g. kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80 and --host http://localhost:8080) "
                "and your credentials"
            ) from None
    return str(run.run_id)


def _task_output(task_dir: Path):
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("parameterValues", {}).get("Output")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("compile", "run-local", "submit"), help="what to do with the pipeline")
    parser.add_argument("--output", default=None, help=f"compile: IR YAML path (default {DEFAULT_IR.relative_to(DEFAULT_IR.parents[1])})")
    parser.add_argument("--host", default=None, help=f"submit: Kubeflow Pipelines API URL (default ${HOST_ENV} or pipeline.host)")
    parser.add_argument("--raw-dir", default=None, help="the export's folder as the tasks see it (default: paths.raw, or pipeline.data_mount with a data PVC)")
    parser.add_argument("--pipeline-root", default=None, help="run-local: task outputs folder (default <paths.artifacts>/kfp-local)")
    parser.add_argument("--no-promote", action="store_true", help="register as candidate only; do not move champion")
    parser.add_argument("--run-name", default=None, help="submit: the run's name")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    profile = args.profile
    if args.action == "compile" and profile is None:
        profile = CLUSTER_PROFILE
    params = load_params(args.params, profile=profile, overrides=dict(parse_override(s) for s in overrides))

    if args.action == "compile":
        path = compile_pipeline(params, args.output or DEFAULT_IR)
        print(f"compiled radsynth_pipeline ({params.profile} profile) -> {path}")
        return 0

    if args.action == "run-local":
        result = run_local(params, overrides, raw_dir=args.raw_dir, pipeline_root=args.pipeline_root,
                           promote=not args.no_promote)
        print(f"task outputs: {result.run_dir}")
        if result.gate_passed is False:
            print("gate failed: the model was not exported or registered (see the evaluate task's report)")
            return 1
        print(f"gate passed; registered model version {result.model_version}"
              + ("" if args.no_promote else " (alias champion)"))
        return 0

    host = args.host or os.environ.get(HOST_ENV) or params.pipeline.host
    if not host:
        raise RadsynthError(f"no Kubeflow Pipelines host: pass --host URL, set ${HOST_ENV}, or set pipeline.host in params.yaml")
    run_id = submit(params, host, overrides, raw_dir=args.raw_dir, promote=not args.no_promote, run_name=args.run_name)
    print(f"submitted run {run_id} to {host} (experiment {params.pipeline.experiment!r}, namespace {params.pipeline.namespace!r})")
    return 0
