"""Step ``register`` and the commands ``promote`` / ``rollback``: the MLflow model registry.

* ``register``: when the evaluation gate failed (or the export was refused) registers nothing and
  records the refusal in ``register.json`` (``{"registered": false, "refused": true, "reason": ...}``,
  and a ``model_card.md`` saying so; the CLI exits 0 with ``--allow-refusal``, as DVC runs it,
  else 1). Otherwise it logs the exported ONNX generator (``mlflow.onnx.log_model``, a directory
  with ``model.onnx``, a signature and an input example read from its graph) as a new version
  of ``registry.model_name``, then the evaluation metrics against that logged model (MLflow 3
  links them), tags the version (``onnx_sha256``, ``classes``, ``z_dim``, ``img_resolution``,
  ``img_channels``, ``variant``, ``train_run_id``, ``git_commit``, ``data_md5``,
  ``params_digest``, ``gate``, ``gate_level``, ``gate_release_passed``, ``classifier_version``,
  ``model_card``), sets the generated model card (:mod:`radsynth.model_card`) as its
  description and points alias ``candidate`` at it. The domain classifier ONNX is registered
  beside it as ``registry.classifier_name``.
* ``promote``: moves ``champion`` to a version (default: the ``candidate``) only when its
  gate passed, and says why it refuses otherwise; the classifier's ``champion`` follows, and so
  does the encoder's (the newest encoder trained against that exact generator ONNX).
* ``rollback``: moves ``champion`` back to the previous champion (history kept as JSON in
  the registered model's tag ``registry.history_tag``: :func:`radsynth.registry.champion_history`).
* Every version ``promote``/``rollback`` makes ``champion`` (generator, classifier, encoder) is
  signed (:mod:`radsynth.signing`: model, version and ONNX sha256, with the key only the
  promoting step holds); ``radsynth serve`` refuses a registry version without that signature.

Versions are always resolved by alias (:func:`radsynth.registry.resolve_alias`, the library
serving uses too), never as "latest".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from radsynth import registry
from radsynth.config import Params
from radsynth.registry import RegistryError

STEP = "register"


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RegistryError(f"{path}: missing; run `radsynth {what}` first")
    return json.loads(path.read_text())


def training_lineage(train_dir: Path, generator_sha256: str | None) -> dict:
    """The training run behind an exported generator: ``train_run_id``, kimg, seconds, device.

    Read from ``<train_dir>/G_ema.json`` (and ``train.json``) only when that ``G_ema`` is the
    one exported (its sha256 equals ``export.json``'s ``generator_sha256``); otherwise unknown.
    """
    sidecar = train_dir / "G_ema.json"
    if not sidecar.is_file():
        return {}
    meta = json.loads(sidecar.read_text())
    if generator_sha256 and meta.get("sha256") != generator_sha256:
        return {}
    summary = json.loads((train_dir / "train.json").read_text()) if (train_dir / "train.json").is_file() else {}
    return {"train_run_id": str(meta.get("train_run_id") or summary.get("mlflow_run_id") or "unknown"),
            "kimg": meta.get("kimg", summary.get("kimg")), "seconds": summary.get("seconds"), "device": summary.get("device")}


def _known(*values) -> str:
    return next((str(v) for v in values if v not in (None, "", "unknown")), "unknown")


def register(params: Params, export_dir: str | Path | None = None, eval_dir: str | Path | None = None,
             dataset_dir: str | Path | None = None, train_dir: str | Path | None = None) -> dict:
    """Register the exported generator (and the domain classifier) as new ``candidate`` versions.

    The registration run logs the ONNX models first (signature + input example), then the
    evaluation metrics against the generator's logged model (MLflow 3 links them), the reports
    and the model card. The version gets the lineage tags (``train_run_id``, ``data_md5``,
    ``git_commit``, ``params_digest``), the gate's verdict and level (``gate``, ``gate_level``,
    ``gate_release_passed``) and the model card as its description.

    Args:
        params: resolved config (``registry`` names, ``paths.mlflow_uri``).
        export_dir: folder with ``generator.onnx`` + ``export.json`` (default ``<artifacts>/export``).
        eval_dir: folder with ``metrics.json``, ``gate.json``, ``evaluate.json``, ``classifier.onnx``
            and optionally ``calibration.json`` (default ``<artifacts>/evaluate``).
        dataset_dir: the prepared dataset, for the card's counts (default ``<artifacts>/dataset``; optional).
        train_dir: the training folder, for the training run (default ``<artifacts>/train``; optional).

    Returns:
        ``{"model": name, "version": int, "gate": "passed"|"failed", "gate_level": ..., "run_id": ...,
        "classifier_version": int, "model_card": artefact URI, ...}`` (also ``<artifacts>/register/register.json``).
    """
    import tempfile

    import mlflow

    from radsynth import metric_keys as mk
    from radsynth import model_card
    from radsynth.io import atomic_write_text, sha256_file, write_json
    from radsynth.tracking import provenance

    registry.quiet()
    art = Path(params.paths.artifacts)
    export_dir = Path(export_dir or art / "export")
    eval_dir = Path(eval_dir or art / "evaluate")
    dataset_dir = Path(dataset_dir or art / "dataset")
    train_dir = Path(train_dir or art / "train")
    from radsynth.gate import refusal

    refused = refusal(eval_dir, STEP)
    record = _read(export_dir / "export.json", "export")
    if refused is None and record.get("refused"):
        refused = {**record, "step": STEP}
    if refused is not None:
        out = {**refused, "registered": False}
        write_json(art / STEP / "register.json", out)
        atomic_write_text(art / STEP / model_card.CARD_FILE,
                          f"# Not registered\n\nNothing was registered: {out['reason']}\n")
        (art / STEP / model_card.GRID_FILE).unlink(missing_ok=True)
        return out
    onnx_path = export_dir / record.get("file", "generator.onnx")
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: missing; run `radsynth export` first")
    sha = sha256_file(onnx_path)
    if sha != record.get("sha256"):
        raise RegistryError(f"{onnx_path}: sha256 {sha[:12]}... differs from export.json {str(record.get('sha256'))[:12]}...; re-run `radsynth export`")
    gate = _read(eval_dir / "gate.json", "evaluate")
    metrics = _read(eval_dir / "metrics.json", "evaluate")
    summary = _read(eval_dir / "evaluate.json", "evaluate")
    evaluated = (summary.get("generator") or {}).get("sha256")
    if evaluated and record.get("generator_sha256") and evaluated != record["generator_sha256"]:
        raise RegistryError(f"{eval_dir} evaluated generator {evaluated[:12]}..., but {export_dir} exported "
                            f"{record['generator_sha256'][:12]}...; evaluate the exported generator before registering it")
    meta = record.get("metadata", {})
    classes = json.loads(meta.get("classes", "[]"))
    prov = provenance(params)
    trained = training_lineage(train_dir, record.get("generator_sha256"))
    level = model_card.gate_level(gate)
    lineage = {
        "train_run_id": _known(meta.get("train_run_id"), (summary.get("generator") or {}).get("train_run_id"), trained.get("train_run_id")),
        "git_commit": prov["git_commit"],
        "data_md5": _known(meta.get("data_md5"), prov["data_md5"]),
        "params_digest": _known(meta.get("params_digest"), prov["params_digest"]),
        "data_identity": str((summary.get("protocol") or {}).get("data_identity", "")),
    }
    tags = {
        "onnx_sha256": sha, "classes": meta.get("classes", "[]"), "z_dim": meta.get("z_dim", ""),
        "img_resolution": meta.get("img_resolution", ""), "img_channels": meta.get("img_channels", ""),
        "variant": meta.get("variant", "unknown"), **{k: lineage[k] for k in ("train_run_id", "git_commit", "data_md5", "params_digest")},
        "gate": level.verdict, "gate_level": level.level, "gate_release_passed": level.release_passed,
        "gate_failed": json.dumps(gate.get("failed", [])), "opset": str(record.get("opset", "")),
        "profile": params.profile, "display_names": json.dumps({c: params.display_name(c) for c in classes}),
    }
    counts = model_card.counts_per_condition(dataset_dir) if (dataset_dir / "dataset.json").is_file() else None
    calibration = model_card.read_optional_json(eval_dir / "calibration.json")
    client = registry.client(params)
    name, clf_name = params.registry.model_name, params.registry.classifier_name
    card_dir = art / STEP
    with mlflow.start_run(run_name=f"{STEP}-{name}", nested=mlflow.active_run() is not None) as run, \
            tempfile.TemporaryDirectory(prefix="radsynth-card-") as tmp:
        mlflow.set_tags({**tags, "step": STEP})
        for f in ("gate.json", "gate.md", "evaluate.json", "metrics.json", "calibration.json"):
            if (eval_dir / f).is_file():
                mlflow.log_artifact(str(eval_dir / f), artifact_path="evaluate")
        mlflow.log_artifact(str(export_dir / "export.json"), artifact_path="export")
        mlflow.log_dict(params.to_dict(), "params.yaml")
        clf_version = None
        if (eval_dir / "classifier.onnx").is_file():
            clf_info = registry.log_onnx_model(eval_dir / "classifier.onnx", clf_name)
            clf_version = int(clf_info.registered_model_version)
            mlflow.log_metrics({k: float(metrics[k]) for k in metrics if k.startswith(mk.REAL_ACC) and _finite(metrics[k])},
                               model_id=clf_info.model_id)
            clf_tags = {"onnx_sha256": sha256_file(eval_dir / "classifier.onnx"), "classes": meta.get("classes", "[]"),
                        "real_acc": str(metrics.get(mk.REAL_ACC)), "data_identity": lineage["data_identity"],
                        "git_commit": prov["git_commit"], "train_run_id": lineage["train_run_id"]}
            for k, v in clf_tags.items():
                client.set_model_version_tag(clf_name, str(clf_version), k, v)
            client.set_registered_model_alias(clf_name, params.registry.candidate_alias, str(clf_version))
        # The model first, then its metrics: MLflow 3 links metrics logged with its model_id to it.
        info = registry.log_onnx_model(onnx_path, name)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _finite(v)}, model_id=info.model_id)
        version = int(info.registered_model_version)
        grid = Path(tmp) / model_card.GRID_FILE
        model_card.sample_grid(onnx_path, classes, params.registry.card_grid_per_class, params.registry.card_grid_seed, grid,
                               [params.display_name(c) for c in classes])
        card_args = dict(name=name, version=version, lineage=lineage, export_record=record, gate=gate, metrics=metrics,
                         classes=classes, counts=counts, train_summary=trained or None, calibration=calibration)
        card = model_card.render(params, **card_args)
        (Path(tmp) / model_card.CARD_FILE).write_text(card)
        mlflow.log_artifacts(tmp, artifact_path="model_card")
        card_uri = f"runs:/{run.info.run_id}/model_card/{model_card.CARD_FILE}"
        atomic_write_text(card_dir / model_card.CARD_FILE, card)
        (card_dir / model_card.GRID_FILE).write_bytes(grid.read_bytes())
    client.update_model_version(name, str(version), description=model_card.description(
        card, model_card.render(params, **card_args, compact=True), card_uri))
    for k, v in {**tags, "run_id": run.info.run_id, "classifier_version": str(clf_version or ""), "model_card": card_uri}.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_registered_model_alias(name, params.registry.candidate_alias, str(version))
    out = {"registered": True, "model": name, "version": version, "alias": params.registry.candidate_alias, "gate": level.verdict,
           "gate_level": level.level, "gate_release_passed": level.release_passed, "run_id": run.info.run_id,
           "train_run_id": lineage["train_run_id"], "model_id": info.model_id, "onnx_sha256": sha,
           "classifier": clf_name, "classifier_version": clf_version, "model_card": card_uri,
           "tracking_uri": mlflow.get_tracking_uri()}
    write_json(card_dir / "register.json", out)
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sign(client, params: Params, name: str, version: str) -> None:
    """Sign ``name`` v``version`` (its ``onnx_sha256`` tag, set at registration) for serving."""
    from radsynth.signing import load_private_key, sign

    sha = (client.get_model_version(name, str(version)).tags or {}).get("onnx_sha256")
    if not sha:
        raise RegistryError(f"{name} v{version} has no onnx_sha256 tag; it cannot be signed for serving")
    for key, value in sign(load_private_key(params.signing, create=True), name, version, sha).items():
        client.set_model_version_tag(name, str(version), key, value)


def _set_champion(client, params: Params, mv) -> None:
    reg = params.registry
    clf_version = (mv.tags or {}).get("classifier_version")
    enc_version = _encoder_for(client, params.registry.encoder_name, (mv.tags or {}).get("onnx_sha256", ""))
    _sign(client, params, reg.model_name, str(mv.version))  # signed before any alias moves
    if clf_version:
        _sign(client, params, reg.classifier_name, clf_version)
    if enc_version:
        _sign(client, params, params.registry.encoder_name, enc_version)
    client.set_registered_model_alias(reg.model_name, reg.champion_alias, str(mv.version))
    if clf_version:
        client.set_registered_model_alias(reg.classifier_name, reg.champion_alias, clf_version)
    if enc_version:
        client.set_registered_model_alias(params.registry.encoder_name, reg.champion_alias, enc_version)


def _encoder_for(client, encoder_name: str, generator_onnx_sha256: str) -> str | None:
    """The newest encoder version trained against exactly this generator ONNX, if any."""
    from mlflow.exceptions import MlflowException

    if not generator_onnx_sha256:
        return None
    try:
        versions = client.search_model_versions(f"name='{encoder_name}'")
    except MlflowException:
        return None
    matching = [int(v.version) for v in versions if (v.tags or {}).get("generator_onnx_sha256") == generator_onnx_sha256]
    return str(max(matching)) if matching else None


def promote(params: Params, version: int | None = None) -> dict:
    """Move ``champion`` to ``version`` (default: the ``candidate``) if and only if its gate passed.

    Raises:
        RegistryError: no such version / no candidate, or its gate did not pass (the message
            names the failed checks).
    """
    client = registry.client(params)
    reg = params.registry
    name = reg.model_name
    if version is None:
        version = registry.alias_version(client, name, reg.candidate_alias)
        if version is None:
            raise RegistryError(f"{name} has no @{reg.candidate_alias}; run `radsynth register` or pass --version")
    mv = registry.model_version(client, name, int(version))
    tags = mv.tags or {}
    if tags.get("gate") != "passed":
        failed = tags.get("gate_failed", "[]")
        why = f"its evaluation gate {tags.get('gate', 'was never recorded')}"
        raise RegistryError(f"refusing to promote {name} v{mv.version} to @{reg.champion_alias}: {why}"
                            + (f" (failed checks: {', '.join(json.loads(failed))})" if failed not in ("", "[]") else "")
                            + "; see gate.md of that run, retrain or re-evaluate")
    current = registry.alias_version(client, name, reg.champion_alias)
    if current == int(mv.version):
        return {"model": name, "champion": current, "previous": current, "changed": False}
    history = registry.champion_history(client, params)
    if current is not None:
        history.append(current)
        registry.set_champion_history(client, params, history)
    _set_champion(client, params, mv)
    return {"model": name, "champion": int(mv.version), "previous": current, "changed": True}


def rollback(params: Params) -> dict:
    """Move ``champion`` back to the previous champion (the last entry of the history tag).

    Raises:
        RegistryError: there is no previous champion.
    """
    client = registry.client(params)
    reg = params.registry
    name = reg.model_name
    history = registry.champion_history(client, params)
    current = registry.alias_version(client, name, reg.champion_alias)
    while history:
        previous = history.pop()
        if previous == current:
            continue
        mv = registry.model_version(client, name, previous)
        registry.set_champion_history(client, params, history)
        _set_champion(client, params, mv)
        return {"model": name, "champion": previous, "rolled_back_from": current}
    raise RegistryError(f"{name}: no previous @{reg.champion_alias} to roll back to (history is empty)")


# --------------------------------------------------------------------------------------
# CLI: `register`, `promote`, `rollback` share this module (dispatch on the command name)
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = parser.prog.split()[-1]
    if command == "promote":
        parser.add_argument("--version", type=int, default=None, help="version to promote (default: the @candidate)")
    elif command == STEP:
        parser.add_argument("--export-dir", default=None, help="folder with generator.onnx + export.json (default <artifacts>/export)")
        parser.add_argument("--eval-dir", default=None, help="folder with the gate reports (default <artifacts>/evaluate)")
        parser.add_argument("--dataset-dir", default=None, help="prepared dataset, for the model card's counts (default <artifacts>/dataset)")
        parser.add_argument("--train-dir", default=None, help="training folder, for the training run's id (default <artifacts>/train)")
        parser.add_argument("--allow-refusal", action="store_true", help="exit 0 when a failed gate refuses registration (DVC runs it so)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    if args.command == "promote":
        out = promote(params, args.version)
        if out["changed"]:
            print(f"{out['model']}@{params.registry.champion_alias} -> v{out['champion']} (was v{out['previous']})")
        else:
            print(f"{out['model']} v{out['champion']} is already @{params.registry.champion_alias}")
    elif args.command == "rollback":
        out = rollback(params)
        print(f"{out['model']}@{params.registry.champion_alias} rolled back to v{out['champion']} (was v{out['rolled_back_from']})")
    else:
        out = register(params, args.export_dir, args.eval_dir, args.dataset_dir, args.train_dir)
        if not out.get("registered"):
            print(f"registration refused, nothing registered: {out['reason']}")
            return 0 if args.allow_refusal else 1
        print(f"registered {out['model']} v{out['version']} @{out['alias']} (gate {out['gate']}, level {out['gate_level']}); "
              f"classifier {out['classifier']} v{out['classifier_version']}; model card {out['model_card']}")
    return 0
