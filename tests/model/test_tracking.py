"""MLflow tracking of a tiny run: params, provenance, metrics over kimg, grids, curves."""

import http.server
import threading

import pytest

from components.train import train
from model.trainer import GRADIENT_PENALTY, IMAGES_PER_S, LOSS_D, LOSS_G, WASSERSTEIN
from radsynth.config import load_params
from radsynth.tracking import TrackingWarning, TrainingTracker
from tests.model.datasets import make_dataset


def test_tiny_run_is_tracked_in_mlflow(root, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds = make_dataset(tmp_path / "ds")
    params = load_params(root / "params.yaml", profile="tiny", overrides={
        "train.tracking": True, "train.progress": False, "train.grid_kimg": 0.2,
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
    assert arts == {"grids/grid_8.png", "grids/grid_16.png", "grids/progress", "plots/curves.png"}
    # fixed-z grids while the stages run, not only at their ends (train.grid_kimg 0.2): stage 8 is
    # 0.4 kimg and stage 16 0.8 kimg, so grids at 0.16, 0.32 (stage 8) and 0.56 ... 1.04 (stage 16)
    progress = sorted(a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "grids/progress"))
    kimg = [float(name[len("grid_"):-len("kimg.png")]) for name in progress]
    assert kimg == pytest.approx([0.16, 0.32, 0.56, 0.72, 0.88, 1.04])
    assert (tmp_path / "train" / "stage_16" / "progress" / progress[-1]).is_file()


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


class _Failing(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers every request with HTTP 500."""

    def _fail(self):
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PATCH = do_DELETE = _fail

    def log_message(self, *args):
        pass


def test_a_failing_tracking_server_costs_warnings_not_the_run(root, tmp_path, monkeypatch):
    """Real HTTP errors from a tracking URI: each call retried, then a warning; the model is still written."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ds = make_dataset(tmp_path / "ds")
    params = load_params(root / "params.yaml", profile="tiny", overrides={
        "train.tracking": True, "train.tracking_retries": 2, "train.progress": False,
        "paths.mlflow_uri": f"http://127.0.0.1:{server.server_address[1]}"})
    try:
        with pytest.warns(TrackingWarning, match="MLflow start run failed after 2 attempts"):
            out = train(params, ds.root, tmp_path / "train")
    finally:
        server.shutdown()
    assert out["complete"] and out["mlflow_run_id"] is None and (tmp_path / "train" / "G_ema.safetensors").is_file()
    assert len(out["tracking_warnings"]) == 1            # the tracker turned itself off after the failed start


def test_tracker_retries_then_warns_and_returns(root):
    params = load_params(root / "params.yaml", profile="tiny")
    tracker = TrainingTracker(params, enabled=True, retries=3, backoff_s=0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("tracking server restarting")
        return "ok"

    assert tracker._call("log_metrics", flaky) == "ok" and len(calls) == 3 and not tracker.failures
    with pytest.warns(TrackingWarning, match=r"log_artifact grid.png failed after 3 attempts \(OSError: disk full\)"):
        assert tracker._call("log_artifact grid.png", lambda: (_ for _ in ()).throw(OSError("disk full"))) is None
    assert len(tracker.failures) == 1


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
