"""Serving refuses a registry version the pipeline did not sign: unsigned, tampered, re-labelled."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from serving.repository import RepositoryError, build_repository
from tests.serving.conftest import register_onnx


def _serving(params, name: str, tmp_path: Path):
    return dataclasses.replace(params, serve=dataclasses.replace(params.serve, models=(name,), repository=str(tmp_path / "repo")))


def test_unsigned_champion_is_refused_and_nothing_is_built(registry_params, tiny, tmp_path):
    name = "radsynth-generator-unsigned"
    register_onnx(registry_params, tiny[1], name, "champion", signed=False)
    with pytest.raises(RepositoryError, match="carries no promotion signature"):
        build_repository(_serving(registry_params, name, tmp_path))
    assert not (tmp_path / "repo").exists()
    # the operator can accept unsigned versions explicitly (signing.required: false)
    lax = dataclasses.replace(registry_params, signing=dataclasses.replace(registry_params.signing, required=False))
    assert (build_repository(_serving(lax, name, tmp_path)) / name / "1" / "model.onnx").is_file()


def test_a_signature_copied_to_another_version_is_refused(registry_params, tiny, tmp_path):
    """Someone with registry access registers their own file as v2, copies v1's signature onto it, moves @champion."""
    from mlflow import MlflowClient

    from radsynth.tracking import setup_mlflow
    from tests.serving.tiny import make_generator

    name = "radsynth-generator-relabelled"
    register_onnx(registry_params, tiny[1], name, "champion")
    assert build_repository(_serving(registry_params, name, tmp_path / "ok")).is_dir()  # the signed v1 serves
    _, other = make_generator(tmp_path / "other.onnx", registry_params, seed=5)
    v2 = register_onnx(registry_params, other, name, "candidate", signed=False)
    setup_mlflow(registry_params)
    client = MlflowClient()
    for key, value in client.get_model_version(name, "1").tags.items():
        if key.startswith("radsynth.signature"):
            client.set_model_version_tag(name, str(v2), key, value)
    client.set_registered_model_alias(name, "champion", str(v2))
    with pytest.raises(RepositoryError, match=rf"models:/{name}/{v2}: the promotion signature does not match"):
        build_repository(_serving(registry_params, name, tmp_path))


def test_a_file_replaced_after_promotion_is_refused(registry_params, tiny, tmp_path):
    """The artefact store's model.onnx swapped and the sha256 tag updated to match: the signature still fails."""
    from mlflow import MlflowClient

    from radsynth.io import sha256_file
    from radsynth.tracking import setup_mlflow
    from tests.serving.tiny import make_generator

    name = "radsynth-generator-swapped"
    version = register_onnx(registry_params, tiny[1], name, "champion")
    setup_mlflow(registry_params)
    client = MlflowClient()
    location = client.get_model_version_download_uri(name, str(version))  # file:// with the local artefact root
    stored = Path(location.removeprefix("file://")) / "model.onnx"
    assert stored.is_file()
    _, other = make_generator(tmp_path / "other.onnx", registry_params, seed=9)
    shutil.copyfile(other, stored)
    for data in stored.parent.glob("*.data"):
        data.unlink()
    client.set_model_version_tag(name, str(version), "onnx_sha256", sha256_file(stored))
    with pytest.raises(RepositoryError, match="does not match this model file"):
        build_repository(_serving(registry_params, name, tmp_path))
