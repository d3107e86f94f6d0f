"""Step ``register`` and the commands ``promote`` / ``rollback``: the MLflow model registry.

* ``register``: logs the exported ONNX generator (``mlflow.onnx.log_model``, a directory
  with ``model.onnx``) as a new version of ``registry.model_name`` in a run that holds the
  evaluation metrics, tags the version (``onnx_sha256``, ``classes``, ``z_dim``,
  ``img_resolution``, ``img_channels``, ``variant``, ``git_commit``, ``data_md5``,
  ``params_digest``, ``gate``, ``classifier_version``) and points alias ``candidate`` at it.
  The domain classifier ONNX is registered beside it as ``registry.classifier_name``.
* ``promote``: moves ``champion`` to a version (default: the ``candidate``) only when its
  gate passed, and says why it refuses otherwise; the classifier's ``champion`` follows, and so
  does the encoder's (the newest encoder trained against that exact generator ONNX).
* ``rollback``: moves ``champion`` back to the previous champion (history kept as JSON in
  the registered model's tag ``registry.history_tag``).
* Every version ``promote``/``rollback`` makes ``champion`` (generator, classifier, encoder) is
  signed (:mod:`radsynth.signing`: model, version and ONNX sha256, with the key only the
  promoting step holds); ``radsynth serve`` refuses a registry version without that signature.

Versions are always resolved by alias (:func:`resolve_alias`), never as "latest".
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from radsynth.config import Params
from radsynth.errors import RadsynthError

STEP = "register"


class RegistryError(RadsynthError):
    """A registry operation was refused or cannot be done."""


def _client(params: Params):
    from mlflow import MlflowClient

    from radsynth.tracking import setup_mlflow

    setup_mlflow(params)
    return MlflowClient()


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RegistryError(f"{path}: missing; run `radsynth {what}` first")
    return json.loads(path.read_text())


def _log_onnx(onnx_path: Path, name: str):
    import mlflow
    import onnx

    return mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name,
                                 pip_requirements=["onnx", "onnxruntime"], save_as_external_data=False)


def register(params: Params, export_dir: str | Path | None = None, eval_dir: str | Path | None = None) -> dict:
    """Register the exported generator (and the domain classifier) as new ``candidate`` versions.

    Args:
        params: resolved config (``registry`` names, ``paths.mlflow_uri``).
        export_dir: folder with ``generator.onnx`` + ``export.json`` (default ``<artifacts>/export``).
        eval_dir: folder with ``metrics.json``, ``gate.json``, ``evaluate.json``, ``classifier.onnx``
            (default ``<artifacts>/evaluate``).

    Returns:
        ``{"model": name, "version": int, "gate": "passed"|"failed", "run_id": ..., "classifier_version": int}``.
    """
    import mlflow

    from radsynth import metric_keys as mk
    from radsynth.io import sha256_file, write_json
    from radsynth.tracking import provenance

    _quiet()
    art = Path(params.paths.artifacts)
    export_dir = Path(export_dir or art / "export")
    eval_dir = Path(eval_dir or art / "evaluate")
    record = _read(export_dir / "export.json", "export")
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
    prov = provenance(params)
    verdict = "passed" if gate.get("passed") else "failed"
    tags = {
        "onnx_sha256": sha, "classes": meta.get("classes", "[]"), "z_dim": meta.get("z_dim", ""),
        "img_resolution": meta.get("img_resolution", ""), "img_channels": meta.get("img_channels", ""),
        "variant": meta.get("variant", "unknown"), "git_commit": prov["git_commit"],
        "data_md5": meta.get("data_md5") if meta.get("data_md5") not in (None, "", "unknown") else prov["data_md5"],
        "params_digest": meta.get("params_digest") if meta.get("params_digest") not in (None, "", "unknown") else prov["params_digest"],
        "gate": verdict, "gate_failed": json.dumps(gate.get("failed", [])), "opset": str(record.get("opset", "")),
        "profile": params.profile,
    }
    client = _client(params)
    name, clf_name = params.registry.model_name, params.registry.classifier_name
    with mlflow.start_run(run_name=f"{STEP}-{name}", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({**tags, "step": STEP})
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        mlflow.log_metrics(finite)
        for f in ("gate.json", "gate.md", "evaluate.json", "metrics.json"):
            if (eval_dir / f).is_file():
                mlflow.log_artifact(str(eval_dir / f), artifact_path="evaluate")
        mlflow.log_artifact(str(export_dir / "export.json"), artifact_path="export")
        mlflow.log_dict(params.to_dict(), "params.yaml")
        clf_version = None
        if (eval_dir / "classifier.onnx").is_file():
            clf_info = _log_onnx(eval_dir / "classifier.onnx", clf_name)
            clf_version = int(clf_info.registered_model_version)
            clf_tags = {"onnx_sha256": sha256_file(eval_dir / "classifier.onnx"), "classes": meta.get("classes", "[]"),
                        "real_acc": str(metrics.get(mk.REAL_ACC)), "data_identity": summary.get("protocol", {}).get("data_identity", ""),
                        "git_commit": prov["git_commit"]}
            for k, v in clf_tags.items():
                client.set_model_version_tag(clf_name, str(clf_version), k, v)
            client.set_registered_model_alias(clf_name, params.registry.candidate_alias, str(clf_version))
        info = _log_onnx(onnx_path, name)
    version = int(info.registered_model_version)
    for k, v in {**tags, "run_id": run.info.run_id, "classifier_version": str(clf_version or "")}.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_registered_model_alias(name, params.registry.candidate_alias, str(version))
    out = {"model": name, "version": version, "alias": params.registry.candidate_alias, "gate": verdict,
           "run_id": run.info.run_id, "onnx_sha256": sha, "classifier": clf_name, "classifier_version": clf_version,
           "tracking_uri": mlflow.get_tracking_uri()}
    write_json(art / STEP / "register.json", out)
    return out


def _history(client, params: Params) -> list[int]:
    tags = client.get_registered_model(params.registry.model_name).tags or {}
    try:
        return [int(v) for v in json.loads(tags.get(params.registry.history_tag, "[]"))]
    except (ValueError, TypeError):
        return []


def _alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _version(client, name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None


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
    enc_version = _encoder_for(client, params.web.encoder_name, (mv.tags or {}).get("onnx_sha256", ""))
    _sign(client, params, reg.model_name, str(mv.version))  # signed before any alias moves
    if clf_version:
        _sign(client, params, reg.classifier_name, clf_version)
    if enc_version:
        _sign(client, params, params.web.encoder_name, enc_version)
    client.set_registered_model_alias(reg.model_name, reg.champion_alias, str(mv.version))
    if clf_version:
        client.set_registered_model_alias(reg.classifier_name, reg.champion_alias, clf_version)
    if enc_version:
        client.set_registered_model_alias(params.web.encoder_name, reg.champion_alias, enc_version)


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
    _quiet()
    client = _client(params)
    reg = params.registry
    name = reg.model_name
    if version is None:
        version = _alias_version(client, name, reg.candidate_alias)
        if version is None:
            raise RegistryError(f"{name} has no @{reg.candidate_alias}; run `radsynth register` or pass --version")
    mv = _version(client, name, int(version))
    tags = mv.tags or {}
    if tags.get("gate") != "passed":
        failed = tags.get("gate_failed", "[]")
        why = f"its evaluation gate {tags.get('gate', 'was never recorded')}"
        raise RegistryError(f"refusing to promote {name} v{mv.version} to @{reg.champion_alias}: {why}"
                            + (f" (failed checks: {', '.join(json.loads(failed))})" if failed not in ("", "[]") else "")
                            + "; see gate.md of that run, retrain or re-evaluate")
    current = _alias_version(client, name, reg.champion_alias)
    if current == int(mv.version):
        return {"model": name, "champion": current, "previous": current, "changed": False}
    history = _history(client, params)
    if current is not None:
        history.append(current)
        client.set_registered_model_tag(name, reg.history_tag, json.dumps(history))
    _set_champion(client, params, mv)
    return {"model": name, "champion": int(mv.version), "previous": current, "changed": True}


def rollback(params: Params) -> dict:
    """Move ``champion`` back to the previous champion (the last entry of the history tag).

    Raises:
        RegistryError: there is no previous champion.
    """
    _quiet()
    client = _client(params)
    reg = params.registry
    name = reg.model_name
    history = _history(client, params)
    current = _alias_version(client, name, reg.champion_alias)
    while history:
        previous = history.pop()
        if previous == current:
            continue
        mv = _version(client, name, previous)
        client.set_registered_model_tag(name, reg.history_tag, json.dumps(history))
        _set_champion(client, params, mv)
        return {"model": name, "champion": previous, "rolled_back_from": current}
    raise RegistryError(f"{name}: no previous @{reg.champion_alias} to roll back to (history is empty)")


def resolve_alias(params: Params, alias: str, model_name: str | None = None,
                  dst_dir: str | Path | None = None) -> tuple[int, Path, dict[str, str]]:
    """Resolve ``models:/<name>@<alias>``, download its ONNX and verify its sha256.

    Args:
        params: resolved config.
        alias: ``champion`` or ``candidate`` (any alias).
        model_name: default ``registry.model_name`` (use ``registry.classifier_name`` for the classifier).
        dst_dir: download folder (default ``<artifacts>/registry/<name>-v<version>``).

    Returns:
        ``(version, local path of model.onnx, version tags)``.

    Raises:
        RegistryError: no such alias, no ``model.onnx``, or its sha256 differs from the tag.
    """
    import mlflow

    from radsynth.io import sha256_file

    _quiet()
    client = _client(params)
    name = model_name or params.registry.model_name
    version = _alias_version(client, name, alias)
    if version is None:
        raise RegistryError(f"models:/{name}@{alias} does not exist; register a model and promote it (radsynth register / promote)")
    mv = client.get_model_version(name, str(version))
    dst = Path(dst_dir or Path(params.paths.artifacts) / "registry" / f"{name}-v{version}")
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    onnx_file = local / "model.onnx" if local.is_dir() else local
    if not onnx_file.is_file():
        raise RegistryError(f"models:/{name}/{version} has no model.onnx")
    tags = dict(mv.tags or {})
    expected = tags.get("onnx_sha256")
    actual = sha256_file(onnx_file)
    if expected and actual != expected:
        raise RegistryError(f"models:/{name}/{version}: downloaded model.onnx sha256 {actual[:12]}... != tag {expected[:12]}...; the artefact store is corrupt")
    return version, onnx_file, tags


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
        out = register(params, args.export_dir, args.eval_dir)
        print(f"registered {out['model']} v{out['version']} @{out['alias']} (gate {out['gate']}); "
              f"classifier {out['classifier']} v{out['classifier_version']}")
    return 0


# --------------------------------------------------------------------------------------
# Kubeflow component: the same function in the project image (pipelines/radsynth_pipeline.py)
# --------------------------------------------------------------------------------------
from kfp.dsl import Artifact, Input, Model  # noqa: E402

from pipelines.component import step_component  # noqa: E402


@step_component
def register_component(profile: str, overrides: list, promote: bool, evaluation: Input[Artifact], onnx: Input[Model]) -> str:
    """KFP: register the ONNX generator as ``candidate``; with ``promote``, move ``champion`` to it."""
    from components.register import promote as promote_version
    from components.register import register
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"evaluate": evaluation.path, "export": onnx.path}) as ws:
        record = register(ws.params)
        print(f"registered {record['model']} version {record['version']} (@{record['alias']}, gate {record['gate']})")
        if promote:
            promote_version(ws.params, int(record["version"]))
    return str(record["version"])
