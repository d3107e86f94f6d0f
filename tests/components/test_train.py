"""The ``radsynth train`` command: CLI, errors as one line, and DDP under torchrun (gloo, CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from model.checkpoint import load_generator
from radsynth.cli import main
from tests.model.datasets import make_dataset

OFF = ["--set", "train.tracking=false", "--set", "train.progress=false"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "dataset")


def test_cli_trains_and_writes_outputs(root, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(root)
    out = tmp_path / "train"
    rc = main(["train", "--profile", "tiny", *OFF, "--dataset", str(dataset.root), "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] is True and printed["variant"] == "pgcgan-sa"
    summary = json.loads((out / "train.json").read_text())
    assert [s["resolution"] for s in summary["stages"]] == [8, 16]
    assert (out / "params.yaml").is_file() and (out / "curves.png").is_file()
    G, meta = load_generator(out / "G_ema.safetensors")
    assert meta["params_digest"] and G(torch.randn(2, G.z_dim), torch.tensor([0, 2])).shape == (2, 1, 16, 16)
    from model.trainer import HISTORY_COLUMNS

    header, *rows = (out / "history.tsv").read_text().splitlines()        # what dvc plots reads, against kimg
    assert header.split("\t") == list(HISTORY_COLUMNS) and len(rows) >= 4
    assert float(rows[-1].split("\t")[0]) == pytest.approx(1.2)
    progress = sorted((out / "stage_16" / "progress").glob("grid_*kimg.png"))
    assert progress                                                        # grids while training, not only at the end
    from components.train import progress_html

    page = progress_html(out / "stage_16", 16)                             # the KFP task's HTML visualisation
    assert page.count("<img ") == len(progress) + 1 and page.count("data:image/png;base64,") == len(progress) + 1
    assert page.index("kimg") < page.index("stage end")                   # in training order, stage end last
    assert "no grids" in progress_html(tmp_path / "empty", 16)


def test_cli_errors_are_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(root)
    rc = main(["train", "--profile", "tiny", *OFF, "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no dataset.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc = main(["train", "--profile", "tiny", *OFF, "--set", "model.variant=gan9000", "--dataset", str(tmp_path / "nope")])
    assert rc == 2


def test_ddp_two_cpu_ranks_end_with_equal_weights(root, dataset, tmp_path):
    """`train.ranks: 2` (the cpu profile's setting): `radsynth train` relaunches itself as two gloo ranks."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "radsynth.cli", "train", "--profile", "tiny", *OFF, "--set", "train.ranks=2",
           "--dataset", str(dataset.root), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["complete"]
    digests = summary["rank_G_ema_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (out / "G_ema.safetensors").is_file() and not list(out.glob("**/*rank1*"))
    assert json.loads(proc.stdout)["complete"] is True                    # rank 0's summary, printed once


def test_dvc_plots_draw_the_training_history_against_kimg(root):
    """dvc.yaml's plots name history.tsv columns the trainer writes, with x = kimg (so `dvc plots diff` overlays runs)."""
    import yaml

    from model.trainer import HISTORY_COLUMNS, HISTORY_TSV

    plots = yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
    tables = [p for p in plots if isinstance(p, dict)]
    assert tables
    for entry in tables:
        (name, spec), = entry.items()
        assert spec["x"] == "kimg", name
        for path, columns in spec["y"].items():
            assert path.endswith(f"train/{HISTORY_TSV}")
            assert set(columns) <= set(HISTORY_COLUMNS), (name, columns)
