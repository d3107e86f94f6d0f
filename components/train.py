"""Step ``train``: the progressive WGAN-GP training of the configured variant.

One documented function, :func:`train`; the CLI (``radsynth train``), DVC and Kubeflow call
it. Each resolution stage can be its own invocation (``--stage 16`` starts from
``<out>/stage_8/``), or the whole schedule runs in one call. Re-running resumes from the
last checkpoint; a finished stage is skipped.

Outputs under ``out_dir`` (default ``artifacts/train``):

    stage_<R>/checkpoint.json + .safetensors   full training state (resume point)
    stage_<R>/grid_<R>.png                     G_ema samples per condition at fixed z, stage end
    stage_<R>/progress/grid_<kimg>kimg.png     the same every train.grid_kimg while the stage runs
    G_ema.safetensors + G_ema.json             the final generator (model.checkpoint format)
    history.tsv                                metrics against kimg (dvc plots; MLflow has the same)
    curves.png                                 losses, Wasserstein estimate, gradient penalty
    train.json                                 summary; params.yaml: the resolved config

The recipe (optimiser, penalty, augmentation, EMA) is ``train.recipe``, a named overlay in
``params.yaml``'s ``recipes:`` (``--set train.recipe=wgan-gp-paper`` for the seed's baseline).

Distributed: ``train.ranks: N`` makes ``radsynth train`` relaunch itself as N local ranks
(the ``cpu`` profile uses 2), or run ``torchrun --nproc_per_node N -m radsynth.cli train ...``
yourself (gloo on CPU, nccl on CUDA, each rank on its ``LOCAL_RANK`` GPU); rank 0 writes
every file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from radsynth.config import Params

SUMMARY = "train.json"


def train(
    params: Params,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    stage: int | None = None,
    resume: bool = True,
    on_iteration: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Train G and D on the ``train`` split of a prepared dataset.

    Args:
        params: the resolved config (``model:``, ``train:``, ``seed``, ``paths:``).
        dataset_dir: a :mod:`radsynth.dataset` directory (``artifacts/dataset``).
        out_dir: where checkpoints, grids, the final ``G_ema`` and the summary go.
        stage: a resolution of the schedule to run alone (it starts from the previous
            stage's finished checkpoint); ``None`` runs every stage in order.
        resume: continue from the stage's own checkpoint when there is one; with ``False``
            the stage (or, with ``stage=None``, the whole run) starts over.
        on_iteration: called with the trainer after each iteration (tests, tools).

    Returns:
        The summary written to ``<out_dir>/train.json``: ``variant``, ``schedule``,
        ``stages`` (grid paths), ``kimg``, ``complete``, ``G_ema`` (when the last stage
        finished), ``last`` metrics, ``seconds``, ``mlflow_run_id``, ``rank_G_ema_sha256``.

    Raises:
        radsynth.errors.RadsynthError: bad schedule, missing dataset levels, a checkpoint
            from another config, a missing previous stage, or divergence.
    """
    from model.trainer import train_networks
    from radsynth.dataset import load_dataset
    from radsynth.io import write_json

    out_dir = Path(out_dir)
    dataset = load_dataset(dataset_dir)
    summary = train_networks(params, dataset, out_dir, stage=stage, resume=resume, on_iteration=on_iteration)
    if int(os.environ.get("RANK", "0")) == 0:
        params.save(out_dir / "params.yaml")
        write_json(out_dir / SUMMARY, summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help="prepared dataset directory (default: <paths.artifacts>/dataset)")
    parser.add_argument("--out", default=None, help="output directory (default: <paths.artifacts>/train)")
    parser.add_argument("--stage", type=int, default=None, help="run only this resolution stage, e.g. 16 (reads stage_8/); default: all")
    parser.add_argument("--no-resume", action="store_true", help="start the stage (or the whole run) over instead of resuming")


def launch_ranks(args: argparse.Namespace, params: Params) -> int | None:
    """Run this command as ``train.ranks`` local DDP processes (torchrun); None when already one of them.

    On a 2-core machine two single-threaded gloo ranks are faster than one process with two
    threads, and stay fast when other work takes a core, where spinning OpenMP threads
    collapse (docs/benchmarks.md, "Training").
    """
    n = params.train.ranks
    if n <= 1 or "WORLD_SIZE" in os.environ:
        return None
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "radsynth.cli", "train"]
    for flag, value in (("--params", args.params), ("--profile", args.profile), ("--dataset", args.dataset), ("--out", args.out),
                        ("--stage", args.stage)):
        if value is not None:
            cmd += [flag, str(value)]
    for item in args.set or []:
        cmd += ["--set", item]
    if args.no_resume:
        cmd.append("--no-resume")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    launched = launch_ranks(args, params)
    if launched is not None:
        return launched
    artifacts = Path(params.paths.artifacts)
    summary = train(
        params,
        dataset_dir=args.dataset or artifacts / "dataset",
        out_dir=args.out or artifacts / "train",
        stage=args.stage,
        resume=not args.no_resume,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        brief = {k: summary.get(k) for k in ("variant", "kimg", "complete", "G_ema", "seconds", "mlflow_run_id")}
        print(json.dumps(brief, indent=2))
    return 0


def progress_html(stage_dir: str | os.PathLike, resolution: int) -> str:
    """One self-contained HTML page (images inline) of a stage's grids: the progress grids in
    kimg order, then the stage-end grid. What a Kubeflow user sees in the run page."""
    import base64
    import html

    folder = Path(stage_dir)
    grids = sorted((folder / "progress").glob("grid_*kimg.png")) + sorted(folder.glob(f"grid_{resolution}.png"))
    parts = [f"<!doctype html><meta charset='utf-8'><title>train {resolution}x{resolution}</title>",
             "<style>body{font-family:sans-serif;background:#111;color:#eee}img{image-rendering:pixelated;max-width:100%}</style>",
             f"<h2>G_ema at fixed z, every condition: {resolution}x{resolution} stage</h2>"]
    if not grids:
        parts.append("<p>no grids were written (train.grid_kimg: 0 and the stage did not finish)</p>")
    for path in grids:
        label = "stage end" if path.parent == folder else path.stem.removeprefix("grid_").lstrip("0").replace("kimg", " kimg") or "0 kimg"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(label)}</h3><img alt='{html.escape(label)}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts) + "\n"
