"""Triton model repository builder.

One *description* per model (:class:`ModelDescription`: tensors read from the ONNX graph,
class names and sizes from its metadata or registry tags, batching from ``params.serve``) is
rendered into either flavour of ``config.pbtxt``:

- ``gpu``: production, NGC Triton image: ``platform: "onnxruntime_onnx"`` (ONNX Runtime's CUDA
  execution provider; TensorRT in front of it when ``serve.tensorrt``), ``serve.instance_count``
  instances on every GPU or one instance group per GPU in ``serve.gpus``.
- ``cpu``: Triton's python backend running the same ``model.onnx`` with onnxruntime
  (``serving/triton_model.py`` becomes ``model.py``); the machines here have no onnxruntime
  backend. Instances and onnxruntime threads come from the cores Triton is given
  (:func:`plan`; ``serve.cpus``, ``serve.instance_count``, ``serve.intra_op_threads`` override).

Both flavours carry a ``model_warmup`` (batch 1 and ``max_batch_size``) so the first request
after a load is not slow, and dynamic batching from ``params.serve``.

Build a repository from a local ONNX file (no registry), e.g. for a GPU check::

    radsynth serve --build-only --flavour gpu --onnx artifacts/export/generator.onnx --repository /tmp/repo
    # Python: serving.repository.repository_from_onnx(params, "generator.onnx", "/tmp/repo", flavour="gpu")

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
import math
import os
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
    plan: "Plan"                               # instances and threads for the flavour it was described for
    warmup: bool
    gpus: tuple[int, ...] = ()                 # gpu flavour: one instance group per GPU (empty: every GPU)
    tensorrt: bool = False                     # gpu flavour: TensorRT execution provider before CUDA
    tensorrt_precision: str = "FP16"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many model instances, with how many onnxruntime threads each."""

    flavour: str
    cpus: int                                  # cores Triton is given (serve.cpus or detected)
    instance_count: int                        # per GPU on the gpu flavour
    intra_op_threads: int                      # onnxruntime threads for a small batch (cpu flavour)
    batch_workers: int                         # slices a large batch is cut into, run at once (cpu flavour)
    small_batch: int                           # batches up to this size use the threaded session
    split_batch: int                           # batches from this size are sliced over the workers
    derived: tuple[str, ...]                   # which values came from the rule (not from params)

    def describe(self) -> str:
        source = f"derived from {self.cpus} cores" if self.derived else "from params"
        where = " per GPU" if self.flavour == "gpu" else ""
        if self.flavour == "gpu":
            return f"{self.instance_count} instance(s){where} x {self.intra_op_threads} CPU thread(s) ({source})"
        return (f"{self.instance_count} instance(s); batches <= {self.small_batch} on {self.intra_op_threads} "
                f"onnxruntime thread(s), >= {self.split_batch} cut over {self.batch_workers} worker(s), "
                f"others on 1 thread ({source})")


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

    Uses :func:`radsynth.registry.resolve_alias` (which compares the file with the version's
    ``onnx_sha256`` tag) and additionally refuses a version that has no such tag.

    Args:
        params: resolved config (``paths.mlflow_uri``).
        name: registered model name.
        alias: e.g. ``champion``.
        download_dir: where the artefact is downloaded to.

    Raises:
        RadsynthError: alias unknown, no ``model.onnx``, tag missing, or sha256 mismatch.
    """
    from radsynth.registry import resolve_alias

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


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            quota, period = fields[0], (fields[1] if period_file is None else Path(period_file).read_text().strip())
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
        break
    return max(1, cores)


def plan(cfg: ServeConfig, flavour: str | None = None) -> Plan:
    """How many instances, and how each runs a batch, for ``flavour`` on the cores it is given.

    cpu flavour, ``C = serve.cpus`` cores (default: detected): ``C`` instances, each keeping one
    core busy under load; a batch of at most 2 images (the server is not busy) runs on
    ``min(C, 4)`` onnxruntime threads, and a batch of at least half ``max_batch_size`` (one big
    request) is cut over ``min(C, 4)`` workers, so neither waits on one core. With one
    instance every batch below the split size uses the threads. Measured on 2 cores against
    the other layouts by ``benchmarks/serving.py --parts sweep`` (docs/benchmarks.md, Serving).
    gpu flavour: 2 instances per GPU (one computes while the other's tensors are copied), 1
    CPU thread each (every op runs on the GPU).
    ``serve.instance_count`` / ``intra_op_threads`` / ``batch_workers`` > 0 override the rule.
    """
    flavour = flavour or cfg.flavour
    cpus = cfg.cpus if cfg.cpus > 0 else available_cpus()
    rule = (2, 1, 1) if flavour == "gpu" else (cpus, min(cpus, 4), min(cpus, 4))
    given = (cfg.instance_count, cfg.intra_op_threads, cfg.batch_workers)
    names = ("instance_count", "intra_op_threads", "batch_workers")
    instances, threads, workers = (g if g > 0 else r for g, r in zip(given, rule))
    split = max(2, cfg.max_batch_size // 2)
    return Plan(
        flavour=flavour, cpus=cpus, instance_count=instances, intra_op_threads=threads, batch_workers=workers,
        small_batch=2 if instances > 1 else split - 1, split_batch=split,
        derived=tuple(n for n, g in zip(names, given) if g <= 0),
    )


def describe(cfg: ServeConfig, sources: Iterable[ModelSource], flavour: str | None = None) -> ModelDescription:
    """The one description of a model served from one or more versions, for one flavour.

    Tensors and parameters come from the highest version; every version must have the same
    tensors (Triton serves all versions with one config). Only the instance plan depends on
    the flavour (default ``cfg.flavour``).
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
    layout = plan(cfg, flavour)
    parameters.update(
        registry_version=str(newest.version),
        onnx_sha256=newest.sha256,
        origin=newest.origin,
        intra_op_threads=str(layout.intra_op_threads),
    )
    if layout.flavour == "gpu":
        parameters["intra_op_thread_count"] = str(layout.intra_op_threads)  # Triton's onnxruntime backend reads this key
    else:  # how the python stub runs a batch of each size (serving/triton_model.py)
        parameters.update(batch_workers=str(layout.batch_workers), small_batch=str(layout.small_batch),
                          split_batch=str(layout.split_batch))
    if cfg.tensorrt_precision not in ("FP16", "FP32"):
        raise RepositoryError(f"serve.tensorrt_precision {cfg.tensorrt_precision!r}: use FP16 or FP32")
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
        plan=layout,
        warmup=cfg.warmup,
        gpus=tuple(cfg.gpus),
        tensorrt=cfg.tensorrt,
        tensorrt_precision=cfg.tensorrt_precision,
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


def render_config(desc: ModelDescription, flavour: str | None = None) -> str:
    """``config.pbtxt`` text for one flavour (``cpu`` or ``gpu``; default the description's)."""
    flavour = flavour or desc.plan.flavour
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}; use one of {', '.join(FLAVOURS)}")

    def tensor(t: TensorSpec) -> str:
        text = f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {_dims(t.dims)} ]\n'
        if t.reshape is not None:
            text += f"    reshape: {{ shape: [ {_dims(t.reshape)} ] }}\n"
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
    lines.append(_instance_groups(desc, flavour))
    preferred = ", ".join(str(b) for b in desc.preferred_batch_sizes)
    lines.append(
        "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {desc.max_queue_delay_us}\n}}"
    )
    if flavour == "gpu" and desc.tensorrt:
        lines.append(_tensorrt(desc))
    if desc.warmup and all(d > 0 for t in desc.inputs for d in t.dims):  # warm-up needs concrete shapes
        lines.append(_warmup(desc))
    for key, value in sorted(desc.parameters.items()):
        lines.append(f"parameters {{ key: \"{key}\" value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def _dims(dims: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def _instance_groups(desc: ModelDescription, flavour: str) -> str:
    count = desc.plan.instance_count
    if flavour == "cpu":
        return f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]"
    if not desc.gpus:  # Triton places `count` instances on every visible GPU
        return f"instance_group [ {{ count: {count} kind: KIND_GPU }} ]"
    groups = ",\n".join(f"  {{ name: \"gpu{g}\" count: {count} kind: KIND_GPU gpus: [ {g} ] }}" for g in desc.gpus)
    return f"instance_group [\n{groups}\n]"


def _onnx_shape(t: TensorSpec, batch: int) -> str:
    """``name:NxD1x...`` as ONNX sees the tensor (with its batch axis, after any reshape)."""
    return f"{t.name}:" + "x".join(str(d) for d in (batch, *(t.dims if t.reshape is None else t.reshape)))


def _tensorrt(desc: ModelDescription) -> str:
    """ONNX Runtime's TensorRT provider in front of CUDA, one engine for batch 1..max_batch_size."""
    params = {
        "precision_mode": desc.tensorrt_precision,
        "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"/tmp/radsynth-trt-cache/{desc.name}",
    }
    if all(d > 0 for t in desc.inputs for d in (t.dims if t.reshape is None else t.reshape)):
        params["trt_profile_min_shapes"] = ",".join(_onnx_shape(t, 1) for t in desc.inputs)
        params["trt_profile_opt_shapes"] = ",".join(_onnx_shape(t, desc.max_batch_size) for t in desc.inputs)
        params["trt_profile_max_shapes"] = ",".join(_onnx_shape(t, desc.max_batch_size) for t in desc.inputs)
    body = "\n".join(f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return ("optimization { execution_accelerators {\n  gpu_execution_accelerator: [ {\n"
            f'      name: "tensorrt"\n{body}\n  }} ]\n}} }}')


def _warmup(desc: ModelDescription) -> str:
    """Warm-up requests run at load: batch 1 and ``max_batch_size`` (both distinct shapes)."""
    def inputs() -> str:
        out = []
        for t in desc.inputs:
            data = "random_data: true" if t.data_type in ("TYPE_FP32", "TYPE_FP16", "TYPE_FP64") else "zero_data: true"
            out.append(f'    inputs {{ key: "{t.name}" value: {{ data_type: {t.data_type} dims: [ {_dims(t.dims)} ] {data} }} }}')
        return "\n".join(out)

    sizes = sorted({1, desc.max_batch_size})
    items = ",\n".join(f'  {{\n    name: "batch {b}"\n    batch_size: {b}\n    count: 1\n{inputs()}\n  }}' for b in sizes)
    return f"model_warmup [\n{items}\n]"


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
                desc = describe(cfg, versions, flavour)
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
            layout = plan(cfg, flavour)
            write_json(tmp / "repository.json", {
                "flavour": flavour,
                "models": {n: sorted(s.version for s in v) for n, v in sources.items()},
                "plan": dataclasses.asdict(layout),
                "params_digest": params.digest(),
            })
    return repository


def repository_from_onnx(params: Params, onnx: str | Path | dict[str, str | Path], repository: str | Path,
                         flavour: str = "gpu", **serve: object) -> Path:
    """Build a repository from local ONNX file(s), without the registry (benchmarks, GPU checks).

    Args:
        params: resolved config; its ``serve`` section gives batching, instances, TensorRT.
        onnx: the generator's ONNX file, or ``{model name: file}`` for several models.
        repository: output folder (replaced atomically).
        flavour: ``gpu`` (default) or ``cpu``.
        **serve: ``ServeConfig`` fields to override, e.g. ``tensorrt=True, gpus=(0, 1)``.

    Returns:
        The repository path.
    """
    files = {params.registry.model_name: onnx} if isinstance(onnx, (str, Path)) else dict(onnx)
    unknown = sorted(set(serve) - {f.name for f in dataclasses.fields(ServeConfig)})
    if unknown:
        raise RepositoryError(f"repository_from_onnx: unknown serve field(s) {unknown}")
    cfg = dataclasses.replace(params.serve, onnx={k: str(v) for k, v in files.items()}, models=tuple(files),
                              flavour=flavour, repository=str(repository), **serve)
    return build_repository(dataclasses.replace(params, serve=cfg))
