"""MLflow set-up and the provenance every run and model version carries.

Tracking and registry default to SQLite (``paths.mlflow_uri``) with a local artefact root;
a server URI (``http://...``) is used as given. Provenance: git commit (``$RADSYNTH_GIT_COMMIT``
inside the image), the pinned data version (the md5 in ``data.dvc``), and the params hash.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
