"""The MLflow model registry as radsynth reads it: versions by alias (never "latest"), the champion history.

The one library the register step (``components/register.py``: register, promote, rollback)
and serving (``serving/repository.py``, the reader study, ``radsynth synthesize``) share, so
that an alias resolves and a download is verified the same way everywhere:

* :func:`resolve_alias` / :func:`download_version`: the ONNX of ``models:/<name>@<alias>`` or
  ``models:/<name>/<version>``, its sha256 checked against the version's ``onnx_sha256`` tag.
* :func:`champion_history` / :func:`set_champion_history`: the past champions of a registered
  model, a JSON list of versions in its ``registry.history_tag`` tag (``rollback`` pops it).
* :func:`log_onnx_model`: a new version from an ONNX file, with the signature and input example
  read from its graph (the generator, the classifier and the encoder are registered so).

(``model/registry.py`` is another registry: the GAN variants.) MLflow is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from radsynth.config import Params
from radsynth.errors import RadsynthError


class RegistryError(RadsynthError):
    """A registry operation was refused or cannot be done."""


def quiet() -> None:
    """No MLflow telemetry, and only MLflow's warnings on the console."""
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def client(params: Params):
    """An ``MlflowClient`` on the configured tracking/registry URI (``paths.mlflow_uri``, or the environment's)."""
    from mlflow import MlflowClient

    from radsynth.tracking import setup_mlflow

    quiet()
    setup_mlflow(params)
    return MlflowClient()


def reader(params: Params):
    """An ``MlflowClient`` on the configured URI (``MLFLOW_TRACKING_URI``, else ``paths.mlflow_uri``)
    for pages that only read: unlike :func:`client` it sets no process-wide URI and makes no
    folder or experiment (MLflow itself still opens, or creates, a SQLite file it is pointed at)."""
    from mlflow.tracking import MlflowClient

    quiet()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.paths.mlflow_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(mlflow_client, name: str, alias: str) -> int | None:
    """The version ``name@alias`` points at (``None``: no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def model_version(mlflow_client, name: str, version: int):
    """MLflow's ``ModelVersion`` of ``name`` v``version``.

    Raises:
        RegistryError: no such version.
    """
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None


def champion_history(mlflow_client, params: Params) -> list[int]:
    """Past champions of ``registry.model_name``, oldest first (``[]`` when none or unreadable)."""
    tags = mlflow_client.get_registered_model(params.registry.model_name).tags or {}
    try:
        return [int(v) for v in json.loads(tags.get(params.registry.history_tag, "[]"))]
    except (ValueError, TypeError):
        return []


def set_champion_history(mlflow_client, params: Params, history: list[int]) -> None:
    """Store ``history`` (oldest first) as the champion history of ``registry.model_name``."""
    mlflow_client.set_registered_model_tag(params.registry.model_name, params.registry.history_tag, json.dumps(history))


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
    name = model_name or params.registry.model_name
    version = alias_version(client(params), name, alias)
    if version is None:
        raise RegistryError(f"models:/{name}@{alias} does not exist; register a model and promote it (radsynth register / promote)")
    return download_version(params, version, name, dst_dir)


def download_version(params: Params, version: int, model_name: str | None = None,
                     dst_dir: str | Path | None = None) -> tuple[int, Path, dict[str, str]]:
    """Download one registered version's ONNX and verify its sha256 (see :func:`resolve_alias`).

    Raises:
        RegistryError: no such version, no ``model.onnx``, or its sha256 differs from the tag.
    """
    import mlflow

    from radsynth.io import sha256_file

    name = model_name or params.registry.model_name
    mv = model_version(client(params), name, int(version))
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


_NP_DTYPES = {1: "float32", 6: "int32", 7: "int64", 2: "uint8", 10: "float16", 11: "float64"}


def onnx_signature(onnx_path: str | Path, rows: int = 2):
    """The MLflow signature and a small valid input example of an ONNX model, read from its graph.

    Batch axes (and any other dynamic axis) are ``-1`` in the signature. The example has
    ``rows`` items: ``z`` from :func:`radsynth.latent.z_from_seed` (seed 0), integer inputs
    (``class``) counting through the model's classes, other float inputs (images) in [-1, 1].

    Returns:
        ``(ModelSignature, {input name: array})``.
    """
    import numpy as np
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from radsynth.latent import z_from_seed

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    num_classes = max(1, len(json.loads(meta.get("classes", "[]")) or [0]))
    initializers = {init.name for init in model.graph.initializer}

    def dims(value) -> tuple[int, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)

    def spec(value) -> TensorSpec:
        elem = value.type.tensor_type.elem_type
        if elem not in _NP_DTYPES:
            raise RegistryError(f"{onnx_path}: tensor {value.name!r} has an ONNX type ({elem}) MLflow signatures do not cover")
        return TensorSpec(np.dtype(_NP_DTYPES[elem]), (-1, *dims(value)[1:]), value.name)

    inputs = [v for v in model.graph.input if v.name not in initializers]
    example = {}
    for value in inputs:
        shape = (rows, *(d if d > 0 else 1 for d in dims(value)[1:]))
        dtype = np.dtype(_NP_DTYPES.get(value.type.tensor_type.elem_type, "float32"))
        if dtype.kind in "iu":
            example[value.name] = (np.arange(int(np.prod(shape))) % num_classes).reshape(shape).astype(dtype)
        elif value.name == "z" and len(shape) == 2:
            example[value.name] = z_from_seed(0, rows, shape[1]).astype(dtype)
        else:
            example[value.name] = np.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)
    signature = ModelSignature(inputs=Schema([spec(v) for v in inputs]), outputs=Schema([spec(v) for v in model.graph.output]))
    return signature, example


def log_onnx_model(onnx_path: str | Path, name: str):
    """Log an ONNX file as an MLflow model (signature + input example from its graph) and register it as ``name``.

    Returns:
        MLflow's ``ModelInfo`` (``model_id``, ``registered_model_version``).
    """
    import mlflow
    import onnx

    signature, example = onnx_signature(onnx_path)
    return mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name,
                                 signature=signature, input_example=example,
                                 pip_requirements=["onnx", "onnxruntime"], save_as_external_data=False)
