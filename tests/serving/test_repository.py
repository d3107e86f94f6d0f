"""Model repository: tensors from the ONNX file, both flavours from one set of sources, the instance
plan from the cores, warm-up, the gpu flavour's execution providers, registry + sha256."""

from __future__ import annotations

import dataclasses
import json
import os

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from radsynth.errors import RadsynthError
from serving.repository import (
    RepositoryError,
    available_cpus,
    build_repository,
    describe,
    local_source,
    plan,
    read_onnx,
    render_config,
    repository_from_onnx,
)
from tests.serving.conftest import CLASSES, MODEL, register_onnx, serving_params

_DTYPES = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(int64)": model_config_pb2.TYPE_INT64}


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_both_flavours_from_one_description(tiny, tmp_path):
    params = serving_params(tmp_path, **{"serve.instance_count": 3, "serve.intra_op_threads": 2, "serve.max_queue_delay_us": 1234})
    sources = [local_source(MODEL, tiny[1])]
    cpu, gpu = _parse(render_config(describe(params.serve, sources, "cpu"))), _parse(render_config(describe(params.serve, sources, "gpu")))

    assert cpu.backend == "python" and cpu.default_model_filename == "model.py" and not cpu.platform
    assert gpu.platform == "onnxruntime_onnx" and gpu.default_model_filename == "model.onnx" and not gpu.backend
    assert cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for config in (cpu, gpu):
        assert config.max_batch_size == params.serve.max_batch_size == 16           # tiny profile
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 1234
        assert config.instance_group[0].count == 3
        assert config.parameters["intra_op_threads"].string_value == "2"
        assert config.parameters["classes"].string_value == '["NORMAL", "PNEUMONIA", "COVID"]'
        assert config.parameters["z_dim"].string_value == str(tiny[0].z_dim)
        assert [w.batch_size for w in config.model_warmup] == [1, 16]
    assert gpu.parameters["intra_op_thread_count"].string_value == "2"           # the onnxruntime backend's key
    assert not gpu.HasField("optimization")                                     # CUDA EP: the backend's default on KIND_GPU
    # apart from backend/platform, the instance kind and the backend's thread key, the two configs are the same
    for config in (cpu, gpu):
        config.ClearField("backend"), config.ClearField("platform"), config.ClearField("default_model_filename")
        config.instance_group[0].ClearField("kind")
    del gpu.parameters["intra_op_thread_count"]
    for key in ("batch_workers", "small_batch", "split_batch"):                  # the python stub's batch paths
        assert key not in gpu.parameters
        del cpu.parameters[key]
    assert cpu == gpu


def test_warmup_requests_match_the_inputs(tiny, tmp_path):
    """Every input of every warm-up request has the config's dims; integers are zeros (valid classes)."""
    params = serving_params(tmp_path)
    config = _parse(render_config(describe(params.serve, [local_source(MODEL, tiny[1])], "cpu")))
    inputs = {t.name: t for t in config.input}
    assert len(config.model_warmup) == 2
    for warmup in config.model_warmup:
        assert warmup.count == 1 and set(warmup.inputs) == set(inputs)
        for name, value in warmup.inputs.items():
            assert list(value.dims) == list(inputs[name].dims) and value.data_type == inputs[name].data_type
            assert value.WhichOneof("input_data_type") == ("random_data" if value.data_type == model_config_pb2.TYPE_FP32 else "zero_data")
    off = serving_params(tmp_path, **{"serve.warmup": False})
    assert not _parse(render_config(describe(off.serve, [local_source(MODEL, tiny[1])], "cpu"))).model_warmup


@pytest.mark.parametrize("cpus, expected", [(1, (1, 1, 1, 7)), (2, (2, 2, 2, 2)), (4, (4, 4, 4, 2)), (16, (16, 4, 4, 2))])
def test_cpu_plan_is_derived_from_the_cores(tiny, tmp_path, cpus, expected):
    """(instances, threads for a small batch, workers for a large one, small-batch limit)."""
    cfg = serving_params(tmp_path, **{"serve.cpus": cpus}).serve                # tiny: max_batch_size 16
    layout = plan(cfg, "cpu")
    assert (layout.instance_count, layout.intra_op_threads, layout.batch_workers, layout.small_batch) == expected
    assert layout.split_batch == 8
    assert layout.derived == ("instance_count", "intra_op_threads", "batch_workers")
    assert f"derived from {cpus} cores" in layout.describe()
    config = _parse(render_config(describe(cfg, [local_source(MODEL, tiny[1])], "cpu")))
    assert config.instance_group[0].count == expected[0]
    assert [config.parameters[k].string_value for k in ("intra_op_threads", "batch_workers", "small_batch", "split_batch")] \
        == [str(v) for v in (*expected[1:], 8)]


def test_params_override_the_plan(tmp_path):
    cfg = serving_params(tmp_path, **{"serve.cpus": 8, "serve.instance_count": 3}).serve
    layout = plan(cfg, "cpu")
    rule = plan(dataclasses.replace(cfg, instance_count=0))
    assert (layout.instance_count, layout.intra_op_threads, layout.batch_workers) == (3, rule.intra_op_threads, rule.batch_workers)
    assert layout.derived == ("intra_op_threads", "batch_workers")
    given = plan(dataclasses.replace(cfg, instance_count=5, intra_op_threads=7, batch_workers=2), "cpu")
    assert (given.instance_count, given.intra_op_threads, given.batch_workers, given.derived) == (5, 7, 2, ())
    assert "from params" in given.describe()
    detected = plan(dataclasses.replace(cfg, cpus=0), "cpu")
    assert detected.cpus == available_cpus() and 1 <= detected.cpus <= len(os.sched_getaffinity(0))
    gpu = plan(dataclasses.replace(cfg, instance_count=0), "gpu")
    assert (gpu.instance_count, gpu.intra_op_threads, gpu.batch_workers) == (2, 1, 1)  # per GPU; CPU threads idle


def test_gpu_flavour_tensorrt_and_one_group_per_gpu(tiny, tmp_path):
    params = serving_params(tmp_path, **{"serve.tensorrt": True, "serve.gpus": [0, 1], "serve.instance_count": 2})
    config = _parse(render_config(describe(params.serve, [local_source(MODEL, tiny[1])], "gpu")))
    assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_GPU, [0]), (2, model_config_pb2.ModelInstanceGroup.KIND_GPU, [1])]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    z_dim = tiny[0].z_dim
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_profile_min_shapes"] == f"z:1x{z_dim},class:1"         # ONNX shapes: class is [N]
    assert accelerator.parameters["trt_profile_max_shapes"] == f"z:16x{z_dim},class:16"
    assert [w.batch_size for w in config.model_warmup] == [1, 16]              # builds the engine at load
    fp32 = serving_params(tmp_path, **{"serve.tensorrt": True, "serve.tensorrt_precision": "FP32"})
    assert _parse(render_config(describe(fp32.serve, [local_source(MODEL, tiny[1])], "gpu"))).optimization \
        .execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP32"
    with pytest.raises(RepositoryError, match="tensorrt_precision 'INT4'"):
        describe(dataclasses.replace(params.serve, tensorrt_precision="INT4"), [local_source(MODEL, tiny[1])], "gpu")
    cpu = _parse(render_config(describe(params.serve, [local_source(MODEL, tiny[1])], "cpu")))
    assert not cpu.HasField("optimization") and len(cpu.instance_group) == 1   # cpu flavour ignores the GPU keys


def test_repository_from_onnx_for_a_gpu_check(tiny, tmp_path):
    """What a GPU check calls: a gpu-flavour repository from a local file, no registry."""
    params = serving_params(tmp_path)
    repo = repository_from_onnx(params, tiny[1], tmp_path / "gpu-repo", tensorrt=True, gpus=(0,))
    assert sorted(p.name for p in (repo / MODEL / "1").iterdir()) == ["model.onnx", "radsynth.json"]
    config = _parse((repo / MODEL / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and list(config.instance_group[0].gpus) == [0]
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    index = json.loads((repo / "repository.json").read_text())
    assert index["flavour"] == "gpu" and index["plan"]["instance_count"] == 2
    with pytest.raises(RepositoryError, match="unknown serve field"):
        repository_from_onnx(params, tiny[1], tmp_path / "x", tensor_rt=True)


def test_config_tensors_match_the_onnx_file(tiny, tmp_path):
    params = serving_params(tmp_path)
    config = _parse(render_config(describe(params.serve, [local_source(MODEL, tiny[1])], "gpu")))
    session = ort.InferenceSession(str(tiny[1]), providers=["CPUExecutionProvider"])
    onnx_tensors = {t.name: t for t in [*session.get_inputs(), *session.get_outputs()]}
    for t in [*config.input, *config.output]:
        onnx_t = onnx_tensors.pop(t.name)
        assert t.data_type == _DTYPES[onnx_t.type]
        expected = [d if isinstance(d, int) else -1 for d in onnx_t.shape[1:]] or [1]  # batch axis excluded
        assert all(e in (-1, d) for e, d in zip(expected, t.dims)) and len(t.dims) == len(expected)
        if len(onnx_t.shape) == 1:                                              # class [N] -> [1] + reshape []
            assert t.HasField("reshape") and list(t.reshape.shape) == []
    assert not onnx_tensors                                                     # nothing left unserved
    assert [t.name for t in config.input] == ["z", "class"] and [t.name for t in config.output] == ["image"]
    assert list(config.output[0].dims) == [1, 16, 16]


def test_repository_from_registry_has_a_folder_per_version(registry_params, tiny, tmp_path):
    params = _with_serve(registry_params, repository=str(tmp_path / "repo"), aliases=("champion",))
    repo = build_repository(params)
    model_dir = repo / MODEL
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["1"]
    files = {p.name for p in (model_dir / "1").iterdir()}
    assert {"model.onnx", "model.py", "radsynth.json"} <= files
    assert any(name.endswith(".data") for name in files)                       # mlflow's external tensors travel too
    config = _parse((model_dir / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [1]
    assert config.parameters["registry_version"].string_value == "1"
    assert config.parameters["origin"].string_value == "models:/radsynth-generator@champion (v1)"

    gpu_repo = build_repository(params, tmp_path / "repo-gpu", flavour="gpu")
    assert not (gpu_repo / MODEL / "1" / "model.py").exists()
    assert _parse((gpu_repo / MODEL / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"


def _with_serve(params, **changes):
    return dataclasses.replace(params, serve=dataclasses.replace(params.serve, **changes))


def test_several_models_and_versions(registry_params, tiny, tmp_path):
    """A generator at v1 (@candidate) and v2 (@champion) plus a local second model, in one repository."""
    name = "radsynth-generator-two-versions"                                   # its own name in the session registry
    register_onnx(registry_params, tiny[1], name, "candidate")
    register_onnx(registry_params, tiny[1], name, "champion")
    params = _with_serve(registry_params, models=(name, "radsynth-classifier"), aliases=("champion", "candidate"),
                         onnx={"radsynth-classifier": str(tiny[1])}, repository=str(tmp_path / "repo"))
    repo = build_repository(params)
    assert sorted(p.name for p in (repo / name).iterdir() if p.is_dir()) == ["1", "2"]
    assert list(_parse((repo / name / "config.pbtxt").read_text()).version_policy.specific.versions) == [1, 2]
    assert (repo / "radsynth-classifier" / "1" / "model.onnx").is_file()


def test_sha256_mismatch_is_refused(registry_params, tiny, tmp_path):
    name = "radsynth-generator-tampered"
    register_onnx(registry_params, tiny[1], name, "champion", sha256="0" * 64)
    params = _with_serve(registry_params, models=(name,), repository=str(tmp_path / "repo"))
    with pytest.raises(RadsynthError, match="sha256 .* != tag"):
        build_repository(params)
    assert not (tmp_path / "repo").exists()                                    # nothing half-built


def test_version_without_sha256_tag_is_refused(registry_params, tiny, tmp_path):
    name = "radsynth-generator-untagged"
    register_onnx(registry_params, tiny[1], name, "champion", sha256="")
    params = _with_serve(registry_params, models=(name,), repository=str(tmp_path / "repo"))
    with pytest.raises(RepositoryError, match="'onnx_sha256' missing; refusing"):
        build_repository(params)


def test_unknown_alias_and_missing_file_are_clear(registry_params, tmp_path):
    params = _with_serve(registry_params, aliases=("nosuch",))
    with pytest.raises(RadsynthError, match="models:/radsynth-generator@nosuch does not exist"):
        build_repository(params, tmp_path / "r")
    with pytest.raises(RepositoryError, match="not found"):
        local_source(MODEL, tmp_path / "missing.onnx")


def test_local_export_manifest_is_checked(tiny, tmp_path):
    onnx_path = tmp_path / "generator.onnx"
    onnx_path.write_bytes(tiny[1].read_bytes())
    (tmp_path / "export.json").write_text('{"sha256": "' + "f" * 64 + '"}')
    with pytest.raises(RepositoryError, match="does not match"):
        local_source(MODEL, onnx_path)


def test_read_onnx_contract(tiny):
    inputs, outputs, meta = read_onnx(tiny[1])
    assert [(t.name, t.data_type, t.dims, t.reshape) for t in inputs] == [
        ("z", "TYPE_FP32", (tiny[0].z_dim,), None), ("class", "TYPE_INT64", (1,), ())]
    assert [(t.name, len(t.dims)) for t in outputs] == [("image", 3)]
    assert meta["classes"] == '["NORMAL", "PNEUMONIA", "COVID"]' and CLASSES == ["NORMAL", "PNEUMONIA", "COVID"]
