"""Step ``encoder``: train the image -> z encoder on the frozen ``G_ema``, export it to ONNX, register it.

Inputs: ``<artifacts>/train/G_ema.safetensors`` (+ ``.json``) and the prepared dataset
``<artifacts>/dataset``. Outputs in ``<artifacts>/encoder/``: ``encoder.onnx`` (input
``image`` [N, C, R, R] float32 in [-1, 1], output ``z`` [N, z_dim]), ``encoder.json`` (sha256,
shapes, reconstruction quality on the validation split, the generator it inverts) and
``params.yaml``. The ONNX model is registered in MLflow as ``registry.encoder_name``
(``radsynth-encoder``) with alias ``candidate``; its version tags name the generator weights
(``generator_sha256``) and, when the export step ran, the generator ONNX (``generator_onnx_sha256``),
so serving can pair an encoder with the generator version it was trained for.

CLI: ``radsynth encoder [--no-register] [--gate DIR [--allow-refusal]]``: with ``--gate`` the step
trains nothing when that evaluation's gate failed and writes ``encoder.json`` as
``{"refused": true, "reason": ...}`` (exit 0 with ``--allow-refusal``, as DVC runs it; else 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from radsynth.config import Params
from radsynth.errors import RadsynthError

STEP = "encoder"


def encoder(params: Params, register: bool = True, progress: bool = True, gate_dir: str | Path | None = None) -> dict[str, Any]:
    """Train, check, export and (optionally) register the encoder.

    Args:
        params: the resolved config (``encoder``, ``paths``).
        register: also log and register the ONNX model in MLflow.
        progress: show a progress bar.
        gate_dir: an evaluation folder whose verdict must have passed (``None``: not checked);
            when it failed, ``encoder.json`` records the refusal and nothing is trained.

    Returns:
        The summary written to ``encoder.json``.

    Raises:
        RadsynthError: the generator or dataset is missing, or the export failed its checks.
    """
    import torch

    from model.checkpoint import load_generator
    from model.encoder import export_onnx, reconstruction_report, train_encoder
    from radsynth.dataset import load_dataset
    from radsynth.io import read_json, sha256_file, write_json

    art = Path(params.paths.artifacts)
    if gate_dir is not None:
        from radsynth.gate import refusal

        refused = refusal(gate_dir, STEP)
        if refused is not None:
            (art / STEP).mkdir(parents=True, exist_ok=True)
            (art / STEP / "encoder.onnx").unlink(missing_ok=True)
            write_json(art / STEP / "encoder.json", refused)
            return refused
    g_path = art / "train" / "G_ema.safetensors"
    if not g_path.is_file():
        raise RadsynthError(f"{g_path} not found: run `radsynth train` first (the encoder inverts the trained G_ema)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    G, meta = load_generator(g_path, device=device)
    data = load_dataset(art / "dataset")
    res = int(G.img_resolution)
    if res not in data.levels:
        raise RadsynthError(f"the dataset has no {res}x{res} level (levels {data.levels}); re-run preprocess")
    if list(meta["classes"]) != data.classes:
        raise RadsynthError(f"G_ema's classes {meta['classes']} differ from the dataset's {data.classes}; retrain or re-preprocess")

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    x_train, y_train = data.images(res, "train"), data.split_labels("train")
    x_val, y_val = data.images(res, "val"), data.split_labels("val")
    if len(x_train) == 0:
        raise RadsynthError("the dataset's train split is empty; nothing to train the encoder on")
    E, losses = train_encoder(G, x_train, y_train, params.encoder, seed=params.seed, progress=progress)
    holdout = (x_val, y_val) if len(x_val) else (x_train[:256], y_train[:256])
    report = reconstruction_report(E, G, holdout[0][:512], holdout[1][:512], seed=params.seed)

    out = art / STEP
    onnx_path = out / "encoder.onnx"
    export_json = art / "export" / "export.json"
    generator_onnx_sha = read_json(export_json).get("sha256") if export_json.is_file() else None
    meta_props = {
        "z_dim": str(G.z_dim), "img_resolution": str(res), "img_channels": str(G.img_channels),
        "classes": json.dumps(list(meta["classes"])), "generator_sha256": str(meta.get("sha256", "")),
        "recon_ssim": f"{report.ssim:.4f}",
    }
    export_onnx(E, onnx_path, meta_props, params.encoder.opset)
    summary = {
        "step": STEP,
        "onnx": str(onnx_path),
        "sha256": sha256_file(onnx_path),
        "opset": params.encoder.opset,
        "z_dim": int(G.z_dim),
        "img_resolution": res,
        "img_channels": int(G.img_channels),
        "classes": list(meta["classes"]),
        "generator_sha256": meta.get("sha256"),
        "generator_onnx_sha256": generator_onnx_sha,
        "steps": params.encoder.steps,
        "final_loss": float(sum(losses[-20:]) / max(1, len(losses[-20:]))),
        "recon_mse": report.mse,
        "recon_ssim": report.ssim,
        "recon_ssim_random_z": report.ssim_random_z,
        "recon_images": report.num_images,
        "params_digest": params.digest(),
        "registered": None,
    }
    if register:
        summary["registered"] = register_encoder(params, onnx_path, summary)
    params.save(out / "params.yaml")
    write_json(out / "encoder.json", summary)
    return summary


def register_encoder(params: Params, onnx_path: Path, summary: dict[str, Any]) -> dict[str, str]:
    """Log ``encoder.onnx`` as an MLflow ONNX model, register it, tag it, alias it ``candidate``.

    Returns:
        ``{"name": ..., "version": ...}``.
    """
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from radsynth.io import sha256_file
    from radsynth.registry import log_onnx_model
    from radsynth.tracking import provenance, setup_mlflow

    setup_mlflow(params)
    name = params.registry.encoder_name
    tags = {
        **provenance(params),
        "onnx_sha256": summary["sha256"],
        "generator_sha256": str(summary["generator_sha256"] or ""),
        "generator_onnx_sha256": str(summary["generator_onnx_sha256"] or ""),
        "z_dim": str(summary["z_dim"]),
        "img_resolution": str(summary["img_resolution"]),
        "img_channels": str(summary["img_channels"]),
        "classes": json.dumps(summary["classes"]),
        "recon_ssim": f"{summary['recon_ssim']:.4f}",
    }
    with mlflow.start_run(run_name=STEP) as run:
        mlflow.log_params({f"encoder_{k}": v for k, v in params.to_dict()["encoder"].items()})
        mlflow.set_tags(tags)
        info = log_onnx_model(onnx_path, name)  # signature + input example; then the metrics, linked to it
        mlflow.log_metrics({"recon_ssim": summary["recon_ssim"], "recon_mse": summary["recon_mse"],
                            "recon_ssim_random_z": summary["recon_ssim_random_z"], "final_loss": summary["final_loss"]},
                           model_id=info.model_id)
    client = MlflowClient()
    version = str(info.registered_model_version)
    # serving verifies the stored model.onnx against this tag: hash the file MLflow stored
    with tempfile.TemporaryDirectory(prefix="radsynth-encoder-") as tmp:
        stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        tags["onnx_sha256"] = sha256_file(stored / "model.onnx" if stored.is_dir() else stored)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, params.registry.candidate_alias, version)
    return {"name": name, "version": version, "run_id": run.info.run_id}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-register", action="store_true", help="train and export only; do not register in MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--gate", default=None, metavar="DIR",
                        help="evaluation folder (e.g. artifacts/evaluate): refuse, and record why, unless its gate passed")
    parser.add_argument("--allow-refusal", action="store_true", help="exit 0 when the gate refuses (DVC runs it so)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    summary = encoder(params, register=not args.no_register, progress=not args.no_progress, gate_dir=args.gate)
    if summary.get("refused"):
        print(f"encoder refused: {summary['reason']}")
        return 0 if args.allow_refusal else 1
    print(f"encoder: {summary['onnx']} (sha256 {summary['sha256'][:12]}), "
          f"reconstruction SSIM {summary['recon_ssim']:.3f} vs {summary['recon_ssim_random_z']:.3f} for random z"
          + (f"; registered {summary['registered']['name']} v{summary['registered']['version']} as candidate"
             if summary["registered"] else ""))
    return 0
