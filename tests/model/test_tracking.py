"""MLflow tracking of a tiny run: params, provenance, metrics over kimg, grids, curves."""

import pytest

from components.train import train
from model.trainer import GRADIENT_PENALTY, IMAGES_PER_S, LOSS_D, LOSS_G, WASSERSTEIN
from radsynth.config import load_params
from tests.model.datasets import make_dataset


def test_tiny_run_is_tracked_in_mlflow(root, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds = make_dataset(tmp_path / "ds")
    params = load_params(root / "params.yaml", profile="tiny", overrides={
        "train.tracking": True, "train.progress": False,
        "paths.mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db", "paths.mlflow_artifacts": str(tmp_path / "mlartifacts"),
    })
    out = train(params, ds.root, tmp_path / "train", stage=8)
    run_id = out["mlflow_run_id"]
    assert run_id
    out16 = train(params, ds.root, tmp_path / "train", stage=16)            # the next stage continues the same run
    assert out16["mlflow_run_id"] == run_id
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.variant"] == "pgcgan-sa" and run.data.params["train.n_critic"] == "5"
    for tag in ("git_commit", "data_md5", "params_digest"):
        assert run.data.tags.get(tag)
    for key in (LOSS_D, LOSS_G, WASSERSTEIN, GRADIENT_PENALTY, IMAGES_PER_S):
        history = client.get_metric_history(run_id, key)
        assert len(history) >= 4, key
    steps = [m.step for m in client.get_metric_history(run_id, WASSERSTEIN)]
    assert steps == sorted(steps) and steps[-1] == 1200                     # step = images shown (1.2 kimg)
    arts = {a.path for folder in ("grids", "plots") for a in client.list_artifacts(run_id, folder)}
    assert arts == {"grids/grid_8.png", "grids/grid_16.png", "plots/curves.png"}


def test_second_setup_with_other_params_uses_its_own_store(tmp_path, monkeypatch):
    import mlflow

    from radsynth.config import load_params
    from radsynth.tracking import setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for name in ("a", "b"):
        params = load_params(overrides={"paths.mlflow_uri": f"sqlite:///{tmp_path}/{name}/mlflow.db",
                                        "paths.mlflow_artifacts": str(tmp_path / name / "art")})
        setup_mlflow(params)
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/{name}/mlflow.db"
    assert "MLFLOW_TRACKING_URI" not in __import__("os").environ


def test_git_commit_inside_the_image_comes_from_the_environment(tmp_path, monkeypatch):
    """infra/Dockerfile bakes RADSYNTH_GIT_COMMIT; the image has no .git, so git alone says 'unknown'."""
    from radsynth.tracking import GIT_COMMIT_ENV, git_commit

    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))             # no repository above tmp_path
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv(GIT_COMMIT_ENV, "0123abcd" * 5)
    assert git_commit(tmp_path) == "0123abcd" * 5
    monkeypatch.setenv(GIT_COMMIT_ENV, "unknown")                            # the Dockerfile's default: not a commit
    assert git_commit(tmp_path) == "unknown"
