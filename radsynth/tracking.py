"""MLflow set-up and the provenance every run and model version carries.

Tracking and registry default to SQLite (``paths.mlflow_uri``) with a local artefact root;
a server URI (``http://...``) is used as given. Provenance: git commit (``$RADSYNTH_GIT_COMMIT``
inside the image), the pinned data version (the md5 in ``data.dvc``), and the params hash.
:class:`TrainingTracker` is the training run's MLflow side (retried, never fatal).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from radsynth.config import Params
from radsynth.errors import RadsynthError

EXPERIMENT = "radsynth"


def setup_mlflow(params: Params, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the configured tracking/registry URI and experiment.

    Returns:
        The experiment id.
    """
    import mlflow

    user_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uri = user_env["MLFLOW_TRACKING_URI"] or params.paths.mlflow_uri
    artifact_location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = Path(params.paths.mlflow_artifacts).resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow exports the URIs it is given as environment variables; put the user's back, so
    # a later call with other params is not overruled by this one's URI.
    for key, value in user_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:
            exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
        mlflow.set_experiment(experiment_id=exp_id)
    except Exception as exc:  # MLflow raises many types for an unreachable server
        raise RadsynthError(f"MLflow at {uri} is not reachable ({type(exc).__name__}: {exc}); start it or fix paths.mlflow_uri") from None
    return exp_id


GIT_COMMIT_ENV = "RADSYNTH_GIT_COMMIT"         # set by infra/Dockerfile (--build-arg GIT_COMMIT=...)


def git_commit(cwd: str | os.PathLike = ".") -> str:
    """The code's commit: ``$RADSYNTH_GIT_COMMIT`` (inside the project image, which holds no
    ``.git``), else the checkout's HEAD (with ``-dirty`` when the tree has changes), else ``unknown``."""
    baked = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if baked and baked != "unknown":
        return baked
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_version(dvc_file: str | os.PathLike = "data.dvc") -> str:
    """The md5 that ``data.dvc`` pins (the data version), or ``unknown``."""
    try:
        outs = yaml.safe_load(Path(dvc_file).read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def provenance(params: Params) -> dict[str, str]:
    """Tags that tie a run or model version to its code, data and config."""
    return {
        "git_commit": git_commit(),
        "data_md5": data_version(),
        "params_digest": params.digest(),
        "profile": params.profile,
    }


# --------------------------------------------------------------------------------------
# The training run's tracker
# --------------------------------------------------------------------------------------


def flatten_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr_g": 1e-3}}`` -> ``{"train.lr_g": 1e-3}`` (lists and dicts as JSON)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


class TrainingTracker:
    """MLflow for a training run (rank 0): params, provenance, metrics, images; never fatal.

    Every MLflow call is tried ``retries`` times (doubling pause from ``backoff_s``); when it
    still fails, one warning names the call and the error, and training goes on: a tracking
    server that is down must not cost a run. A tracker whose ``start`` failed stays off.
    """

    def __init__(self, params: Params, enabled: bool, retries: int = 3, backoff_s: float = 0.5):
        self.params = params
        self.enabled = enabled
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.run_id: str | None = None
        self.failures: list[str] = []

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # MLflow raises many types (HTTP, SQL, OS); none may stop training
                if attempt == self.retries:
                    msg = f"MLflow {what} failed after {self.retries} attempts ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); training continues"
                    self.failures.append(msg)
                    warnings.warn(msg, TrackingWarning, stacklevel=3)
                    return None
                time.sleep(delay)
                delay *= 2

    def start(self, run_id: str | None, tags: dict[str, str]) -> str | None:
        """Continue run ``run_id`` (a later stage) or start one; returns its id or None."""
        if not self.enabled:
            return None
        import mlflow

        def begin() -> str:
            setup_mlflow(self.params)
            run = None
            if run_id:
                try:
                    run = mlflow.start_run(run_id=run_id)
                except Exception:  # a run from another tracking store: start a fresh one
                    run = None
            if run is None:
                run = mlflow.start_run(run_name=f"train-{self.params.model.variant}")
                mlflow.log_params(flatten_params(self.params.to_dict()))
            mlflow.set_tags({**provenance(self.params), **tags})
            return run.info.run_id

        self.run_id = self._call("start run", begin)
        if self.run_id is None:
            self.enabled = False
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self._call("log_metrics", lambda: mlflow.log_metrics(finite, step=step))

    def artifact(self, path: Path, folder: str) -> None:
        if self.enabled:
            import mlflow

            self._call(f"log_artifact {Path(path).name}", lambda: mlflow.log_artifact(str(path), artifact_path=folder))

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            self._call("end run", lambda: mlflow.end_run(status=status))


class TrackingWarning(UserWarning):
    """A tracking call failed; the run continues without it."""
