"""radsynth.signing: a promotion signature binds model, version and file; only the private key signs."""

from __future__ import annotations

import dataclasses
import os

import pytest

from radsynth.config import SigningConfig
from radsynth.signing import (KEY_ID_TAG, SIGNATURE_TAG, SignatureError, load_private_key, load_public_key, main, message,
                              new_private_key, public_of, sign, verify)

SHA = "ab" * 32


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> SigningConfig:
    monkeypatch.delenv("RADSYNTH_TEST_SIGN", raising=False)
    monkeypatch.delenv("RADSYNTH_TEST_VERIFY", raising=False)
    return SigningConfig(key_env="RADSYNTH_TEST_SIGN", key_file=str(tmp_path / "signing.key"),
                         public_key_env="RADSYNTH_TEST_VERIFY", public_key_file="")


def test_signature_verifies_only_for_the_exact_model_version_and_file(cfg):
    private = load_private_key(cfg, create=True)
    tags = sign(private, "radsynth-generator", 3, SHA)
    public = load_public_key(cfg)  # derived from the key file on this machine
    verify(public, "radsynth-generator", 3, SHA, tags)
    for model, version, sha in (("radsynth-generator", 4, SHA), ("radsynth-other", 3, SHA), ("radsynth-generator", 3, "cd" * 32)):
        with pytest.raises(SignatureError, match="does not match"):
            verify(public, model, version, sha, tags)
    with pytest.raises(SignatureError, match="carries no promotion signature"):
        verify(public, "radsynth-generator", 3, SHA, {})
    with pytest.raises(SignatureError, match="not base64"):
        verify(public, "radsynth-generator", 3, SHA, {SIGNATURE_TAG: "%%%"})
    assert tags[KEY_ID_TAG] and message("m", 1, SHA) == b'radsynth-promotion/1 {"model":"m","onnx_sha256":"' + SHA.encode() + b'","version":"1"}'


def test_another_key_cannot_pass_for_the_pipeline(cfg, monkeypatch):
    tags = sign(load_private_key(cfg, create=True), "m", 1, SHA)
    monkeypatch.setenv("RADSYNTH_TEST_VERIFY", public_of(new_private_key()))  # the cluster's public key is another one
    with pytest.raises(SignatureError, match="another key signed it"):
        verify(load_public_key(cfg), "m", 1, SHA, tags)


def test_key_sources_and_clear_errors(cfg, monkeypatch, tmp_path):
    with pytest.raises(SignatureError, match="no signing key"):
        load_private_key(cfg)
    with pytest.raises(SignatureError, match="no key to verify"):
        load_public_key(cfg)
    key = new_private_key()
    monkeypatch.setenv("RADSYNTH_TEST_SIGN", key)
    monkeypatch.setenv("RADSYNTH_TEST_VERIFY", public_of(key))
    verify(load_public_key(cfg), "m", 1, SHA, sign(load_private_key(cfg), "m", 1, SHA))
    assert not os.path.exists(cfg.key_file)  # the environment's key: no file written
    monkeypatch.setenv("RADSYNTH_TEST_SIGN", "c2hvcnQ=")
    with pytest.raises(SignatureError, match="32 bytes"):
        load_private_key(cfg)


def test_keygen_writes_a_private_file_only_the_owner_reads(tmp_path, cfg):
    assert main(["keygen", str(tmp_path / "k"), str(tmp_path / "k.pub")]) == 0
    assert (os.stat(tmp_path / "k").st_mode & 0o077) == 0
    assert main(["keygen", str(tmp_path / "k"), str(tmp_path / "k.pub")]) == 2  # never overwrites a key
    pair = dataclasses.replace(cfg, key_file=str(tmp_path / "k"), public_key_file=str(tmp_path / "k.pub"))
    verify(load_public_key(pair), "m", 1, SHA, sign(load_private_key(pair), "m", 1, SHA))
