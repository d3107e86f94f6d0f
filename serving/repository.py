"""Triton model repository builder.

One *description* per model (:class:`ModelDescription`: tensors read from the ONNX graph,
class names and sizes from its metadata or registry tags, batching from ``params.serve``) is
rendered into either flavour of ``config.pbtxt``:

- ``gpu``: production, NGC Triton image: ``platform: "onnxruntime_onnx"``, GPU instance group.
- ``cpu``: Triton's python backend running the same ``model.onnx`` with onnxruntime
  (``serving/triton_model.py`` becomes ``model.py``); the machines here have no onnxruntime
  backend.

Layout::

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<registry version>/model.onnx       (+ model.py on the cpu flavour)
    <repo>/<model>/<registry version>/radsynth.json    (origin, sha256, tags)

Each model comes from a local ONNX file (``serve.onnx``) or from the MLflow registry by alias
(``serve.aliases``, default ``champion``); one numbered folder per registered version. The
ONNX file's sha256 is checked against the registry's ``onnx_sha256`` tag before it is served,
and (``signing.required``) the version's promotion signature against that file and the
pipeline's public key (:mod:`radsynth.signing`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from radsynth.config import Params, ServeConfig
from radsynth.errors import RadsynthError
from radsynth.io import atomic_dir, sha256_file, write_json

FLAVOURS = ("cpu", "gpu")
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
# Metadata keys carried from ONNX metadata_props / registry tags into config parameters.
METADATA_KEYS = ("classes", "z_dim", "img_resolution", "img_channels", "variant", "kind")

_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
}


class RepositoryError(RadsynthError):
    """The model repository cannot be built (missing model, bad file, sha256 mismatch)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton sees it (batch axis excluded)."""

    name: str
    data_type: str                             # Triton type, e.g. TYPE_FP32
    dims: tuple[int, ...]                      # without the batch axis; -1 for dynamic
    reshape: tuple[int, ...] | None = None     # shape the backend sees (for [N] tensors: ())


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One ONNX file to serve as one numbered version."""

    name: str                                  # Triton / registry model name
    version: int                               # registry version (1 for a local file)
    onnx_path: Path
    sha256: str
    origin: str                                # models:/name@alias (vN) or the local path
    metadata: dict[str, str]                   # classes (JSON), z_dim, ... and registry tags


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """Everything both config flavours are rendered from."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: dict[str, str]                 # class names etc. (strings, as Triton wants)
    versions: tuple[int, ...]
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    instance_count: int


# --------------------------------------------------------------------------------------
# Reading models
# --------------------------------------------------------------------------------------


def read_onnx(path: str | Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], dict[str, str]]:
    """Triton tensor specs and ``metadata_props`` of an ONNX file.

    Every tensor must have a leading batch axis. A rank-1 tensor (``class`` [N]) is exposed
    to clients as ``[1]`` per item and reshaped to ``[]`` for the backend (Triton's way of
    batching scalars).

    Raises:
        RepositoryError: not an ONNX file, or a tensor without a batch axis / known dtype.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise RepositoryError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    initializers = {init.name for init in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tt = value.type.tensor_type
        if tt.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(f"{path}: tensor {value.name!r} has an unsupported ONNX dtype {tt.elem_type}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if not dims:
            raise RepositoryError(f"{path}: tensor {value.name!r} is a scalar; a leading batch axis is required")
        rest = tuple(dims[1:])
        if not rest:
            return TensorSpec(value.name, _ONNX_TO_TRITON[tt.elem_type], (1,), reshape=())
        return TensorSpec(value.name, _ONNX_TO_TRITON[tt.elem_type], rest)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    metadata = {p.key: p.value for p in model.metadata_props}
    return inputs, outputs, metadata


def external_data_files(path: str | Path) -> tuple[Path, ...]:
    """Files holding an ONNX model's external tensors (``mlflow.onnx`` writes them by default)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    files = tuple(path.parent / name for name in sorted(names))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RepositoryError(f"{path}: external tensor data {missing} missing beside the ONNX file")
    return files


def local_source(name: str, path: str | Path) -> ModelSource:
    """A model served from a local ONNX file (version 1).

    When ``export.json`` sits beside the file (written by ``radsynth export``), its
    ``sha256`` must match the file.
    """
    path = Path(path)
    if not path.is_file():
        raise RepositoryError(f"{path}: ONNX file for {name!r} not found (run `radsynth export` or fix serve.onnx)")
    digest = sha256_file(path)
    manifest = path.with_name("export.json")
    if manifest.is_file():
        expected = json.loads(manifest.read_text()).get("sha256")
        if expected and expected != digest:
            raise RepositoryError(f"{path}: sha256 {digest[:12]}... does not match {manifest} ({expected[:12]}...); re-export")
    _, _, metadata = read_onnx(path)
    return ModelSource(name, 1, path.resolve(), digest, str(path.resolve()), metadata)


def registry_source(params: Params, name: str, alias: str, download_dir: str | Path) -> ModelSource:
    """Download the version an alias points at, its sha256 verified against the registry.

    Uses ``components.register.resolve_alias`` (which compares the file with the version's
    ``onnx_sha256`` tag) and additionally refuses a version that has no such tag.

    Args:
        params: resolved config (``paths.mlflow_uri``).
        name: registered model name.
        alias: e.g. ``champion``.
        download_dir: where the artefact is downloaded to.

    Raises:
        RadsynthError: alias unknown, no ``model.onnx``, tag missing, or sha256 mismatch.
    """
    from components.register import resolve_alias

    version, onnx_path, tags = resolve_alias(params, alias, model_name=name, dst_dir=Path(download_dir) / f"{name}-{alias}")
    expected = tags.get("onnx_sha256")
    if not expected:
        raise RepositoryError(f"models:/{name}/{version}: registry tag 'onnx_sha256' missing; refusing to serve an unverified file")
    digest = sha256_file(onnx_path)
    if digest != expected:  # resolve_alias checked it; checked again on the exact file that is copied
        raise RepositoryError(f"models:/{name}/{version}: model.onnx sha256 {digest[:12]}... differs from the registry's {expected[:12]}...")
    if params.signing.required:  # the registry is not trusted: the promotion must be signed for this exact file
        from radsynth.signing import SignatureError, load_public_key, verify

        try:
            verify(load_public_key(params.signing), name, version, digest, tags)
        except SignatureError as exc:
            raise RepositoryError(str(exc)) from None
    _, _, metadata = read_onnx(onnx_path)
    merged = {**metadata, **tags}
    return ModelSource(name, int(version), onnx_path, digest, f"models:/{name}@{alias} (v{version})", merged)


# --------------------------------------------------------------------------------------
# Describing and rendering
# --------------------------------------------------------------------------------------


def describe(cfg: ServeConfig, sources: Iterable[ModelSource]) -> ModelDescription:
    """The one description of a model served from one or more versions.

    Tensors and parameters come from the highest version; every version must have the same
    tensors (Triton serves all versions with one config).
    """
    sources = sorted(sources, key=lambda s: s.version)
    if not sources:
        raise RepositoryError("describe(): no versions given")
    newest = sources[-1]
    inputs, outputs, _ = read_onnx(newest.onnx_path)
    for other in sources[:-1]:
        if read_onnx(other.onnx_path)[:2] != (inputs, outputs):
            raise RepositoryError(f"{newest.name}: v{other.version} and v{newest.version} have different tensors; serve one alias")
    parameters = {k: str(newest.metadata[k]) for k in METADATA_KEYS if k in newest.metadata}
    inputs, outputs = _pin_image_dims(inputs, newest.metadata), _pin_image_dims(outputs, newest.metadata)
    if "classes" in parameters:
        try:
            classes = json.loads(parameters["classes"])
        except json.JSONDecodeError:
            raise RepositoryError(f"{newest.origin}: 'classes' is not a JSON list: {parameters['classes']!r}") from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise RepositoryError(f"{newest.origin}: 'classes' must be a JSON list of names")
    parameters.update(
        registry_version=str(newest.version),
        onnx_sha256=newest.sha256,
        origin=newest.origin,
        intra_op_threads=str(cfg.intra_op_threads),
    )
    preferred = tuple(b for b in cfg.preferred_batch_sizes if b <= cfg.max_batch_size)
    return ModelDescription(
        name=newest.name,
        max_batch_size=cfg.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters,
        versions=tuple(s.version for s in sources),
        preferred_batch_sizes=preferred,
        max_queue_delay_us=cfg.max_queue_delay_us,
        instance_count=cfg.instance_count,
    )


def _pin_image_dims(tensors: tuple[TensorSpec, ...], metadata: dict[str, str]) -> tuple[TensorSpec, ...]:
    """Fill dynamic ``[C, H, W]`` dims of an ``image`` tensor from ``img_channels``/``img_resolution``."""
    try:
        known = (int(metadata["img_channels"]), int(metadata["img_resolution"]), int(metadata["img_resolution"]))
    except (KeyError, ValueError):
        return tensors
    out = []
    for t in tensors:
        if t.name == "image" and len(t.dims) == 3:
            if any(d not in (-1, k) for d, k in zip(t.dims, known)):
                raise RepositoryError(f"tensor 'image' has dims {list(t.dims)} but metadata says {list(known)}")
            t = dataclasses.replace(t, dims=known)
        out.append(t)
    return tuple(out)


def render_config(desc: ModelDescription, flavour: str) -> str:
    """``config.pbtxt`` text for one flavour (``cpu`` or ``gpu``) of a description."""
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}; use one of {', '.join(FLAVOURS)}")

    def tensor(t: TensorSpec) -> str:
        dims = ", ".join(str(d) for d in t.dims)
        text = f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims} ]\n'
        if t.reshape is not None:
            text += f"    reshape: {{ shape: [ {', '.join(str(d) for d in t.reshape)} ] }}\n"
        return text + "  }"

    lines = [f'name: "{desc.name}"']
    if flavour == "gpu":
        lines += ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['backend: "python"', 'default_model_filename: "model.py"']
    lines.append(f"max_batch_size: {desc.max_batch_size}")
    versions = ", ".join(str(v) for v in desc.versions)
    lines.append(f"version_policy: {{ specific: {{ versions: [ {versions} ] }} }}")
    lines.append("input [\n" + ",\n".join(tensor(t) for t in desc.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(tensor(t) for t in desc.outputs) + "\n]")
    kind = "KIND_GPU" if flavour == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {desc.instance_count} kind: {kind} }} ]")
    preferred = ", ".join(str(b) for b in desc.preferred_batch_sizes)
    lines.append(
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {desc.max_queue_delay_us}\n}}"
    )
    for key, value in sorted(desc.parameters.items()):
        lines.append(f"parameters {{ key: \"{key}\" value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def collect_sources(params: Params, download_dir: str | Path) -> dict[str, list[ModelSource]]:
    """Every model in ``serve.models``: from ``serve.onnx`` when given, else the registry."""
    cfg = params.serve
    unknown = sorted(set(cfg.onnx) - set(cfg.models))
    if unknown:
        raise RepositoryError(f"serve.onnx names {unknown} which are not in serve.models {list(cfg.models)}")
    out: dict[str, list[ModelSource]] = {}
    for name in cfg.models:
        if name in cfg.onnx:
            out[name] = [local_source(name, cfg.onnx[name])]
            continue
        if not cfg.aliases:
            raise RepositoryError(f"{name}: no local ONNX (serve.onnx) and no serve.aliases to resolve in the registry")
        by_version: dict[int, ModelSource] = {}
        for alias in cfg.aliases:
            src = registry_source(params, name, alias, download_dir)
            by_version.setdefault(src.version, src)
        out[name] = list(by_version.values())
    return out


def build_repository(params: Params, repository: str | Path | None = None, flavour: str | None = None) -> Path:
    """Build (atomically replace) the Triton model repository.

    Args:
        params: resolved config; ``params.serve`` says which models, aliases, batching.
        repository: output folder; default ``serve.repository``.
        flavour: ``cpu`` or ``gpu``; default ``serve.flavour``.

    Returns:
        The repository path.

    Raises:
        RepositoryError: a model is missing, unreadable, or fails its sha256 check.
    """
    cfg = params.serve
    flavour = flavour or cfg.flavour
    if flavour not in FLAVOURS:
        raise RepositoryError(f"serve.flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    repository = Path(repository or cfg.repository)
    with tempfile.TemporaryDirectory(prefix="radsynth-registry-") as download_dir:
        sources = collect_sources(params, download_dir)
        with atomic_dir(repository) as tmp:
            for name, versions in sources.items():
                desc = describe(cfg, versions)
                model_dir = tmp / name
                model_dir.mkdir()
                (model_dir / "config.pbtxt").write_text(render_config(desc, flavour))
                for src in versions:
                    vdir = model_dir / str(src.version)
                    vdir.mkdir()
                    shutil.copyfile(src.onnx_path, vdir / "model.onnx")
                    for extra in external_data_files(src.onnx_path):
                        shutil.copyfile(extra, vdir / extra.name)
                    if sha256_file(vdir / "model.onnx") != src.sha256:
                        raise RepositoryError(f"{name} v{src.version}: copy of model.onnx changed while building; retry")
                    if flavour == "cpu":
                        shutil.copyfile(PYTHON_MODEL, vdir / "model.py")
                    write_json(vdir / "radsynth.json", {
                        "name": name, "version": src.version, "origin": src.origin,
                        "onnx_sha256": src.sha256, "metadata": src.metadata, "flavour": flavour,
                    })
            write_json(tmp / "repository.json", {
                "flavour": flavour,
                "models": {n: sorted(s.version for s in v) for n, v in sources.items()},
                "params_digest": params.digest(),
            })
    return repository
