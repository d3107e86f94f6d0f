"""Model repository: tensors from the ONNX file, both flavours from one description, registry + sha256."""

from __future__ import annotations

import dataclasses

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from radsynth.errors import RadsynthError
from serving.repository import (
    RepositoryError,
    build_repository,
    describe,
    local_source,
    read_onnx,
    render_config,
)
from tests.serving.conftest import CLASSES, MODEL, register_onnx, serving_params

_DTYPES = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(int64)": model_config_pb2.TYPE_INT64}


def _parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_both_flavours_from_one_description(tiny, tmp_path):
    params = serving_params(tmp_path, **{"serve.instance_count": 3, "serve.max_queue_delay_us": 1234})
    desc = describe(params.serve, [local_source(MODEL, tiny[1])])
    cpu, gpu = _parse(render_config(desc, "cpu")), _parse(render_config(desc, "gpu"))

    assert cpu.backend == "python" and cpu.default_model_filename == "model.py" and not cpu.platform
    assert gpu.platform == "onnxruntime_onnx" and gpu.default_model_filename == "model.onnx" and not gpu.backend
    assert cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for config in (cpu, gpu):
        assert config.max_batch_size == params.serve.max_batch_size == 16           # tiny profile
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 1234
        assert config.instance_group[0].count == 3
        assert config.parameters["classes"].string_value == '["NORMAL", "PNEUMONIA", "COVID"]'
        assert config.parameters["z_dim"].string_value == str(tiny[0].z_dim)
    # apart from backend/platform and the instance kind, the two configs are the same
    for config in (cpu, gpu):
        config.ClearField("backend"), config.ClearField("platform"), config.ClearField("default_model_filename")
        config.instance_group[0].ClearField("kind")
    assert cpu == gpu


def test_config_tensors_match_the_onnx_file(tiny, tmp_path):
    params = serving_params(tmp_path)
    config = _parse(render_config(describe(params.serve, [local_source(MODEL, tiny[1])]), "gpu"))
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
