"""Promotion signatures: the pipeline signs what it promotes; serving refuses what it did not sign.

The registry is not the authority on what may be served: anyone who can write to MLflow can
register a version, tag it ``gate=passed`` and move ``@champion``, and the ``onnx_sha256`` tag
the serving side checks sits in that same MLflow. So promotion (``radsynth promote``, the
pipeline's register step) signs, with a key only it holds, the statement

    radsynth-promotion/1 {"model": <name>, "onnx_sha256": <sha256 of model.onnx>, "version": "<N>"}

and puts the signature on the version (tags ``radsynth.signature``, ``radsynth.signature_key``).
Before it serves a version, ``radsynth serve`` (Triton's init container on a cluster) verifies
the signature against the file it downloaded, with the public key only: a version that is
unsigned, signed by another key, signed for another version, or whose file was replaced is
refused.

Ed25519 (``cryptography``): the verifying side cannot sign. Keys are 32 raw bytes, base64:

- private: ``$<signing.key_env>`` (a Secret mounted only by the register step), else the
  git-ignored ``signing.key_file`` (created once, mode 0600, on the first local promotion);
- public: ``$<signing.public_key_env>`` (Triton's init container), else
  ``signing.public_key_file``, else derived from the private key file on this machine.

``python -m radsynth.signing keygen PRIVATE PUBLIC`` writes a pair for a cluster.
A signature proves the pipeline promoted that exact file as that version at some time; moving
``@champion`` back to an earlier signed version (``radsynth rollback``) stays possible.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from radsynth.config import SigningConfig
from radsynth.errors import RadsynthError

SCHEME = "radsynth-promotion/1"
SIGNATURE_TAG = "radsynth.signature"
KEY_ID_TAG = "radsynth.signature_key"


class SignatureError(RadsynthError):
    """A signature is missing, invalid, or no key is available to make or check one."""


def message(model: str, version: int | str, onnx_sha256: str) -> bytes:
    """The exact bytes that are signed for one promoted version."""
    body = json.dumps({"model": str(model), "onnx_sha256": str(onnx_sha256), "version": str(version)},
                      sort_keys=True, separators=(",", ":"))
    return f"{SCHEME} {body}".encode()


def _decode_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raise SignatureError(f"{where}: not a base64 key") from None
    if len(raw) != 32:
        raise SignatureError(f"{where}: an Ed25519 key is 32 bytes, this one is {len(raw)}")
    return raw


def _private_from_raw(raw: bytes):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(raw)


def _public_raw(key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_private_key() -> str:
    """A fresh private key, base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


def public_of(private_b64: str) -> str:
    """The public key (base64) of a private key (base64)."""
    return base64.b64encode(_public_raw(_private_from_raw(_decode_key(private_b64, "private key")).public_key())).decode()


def _write_private(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(new_private_key() + "\n")


def load_private_key(cfg: SigningConfig, create: bool = False):
    """The signing key: ``$<cfg.key_env>``, else ``cfg.key_file`` (created 0600 when ``create``).

    Raises:
        SignatureError: no key (and ``create`` is False), or the key is malformed.
    """
    env = os.environ.get(cfg.key_env, "") if cfg.key_env else ""
    if env.strip():
        return _private_from_raw(_decode_key(env, f"${cfg.key_env}"))
    path = Path(cfg.key_file)
    if not path.is_file():
        if not create:
            raise SignatureError(f"no signing key: set ${cfg.key_env} or create {cfg.key_file} "
                                 "(`python -m radsynth.signing keygen`)")
        _write_private(path)
    return _private_from_raw(_decode_key(path.read_text(), str(cfg.key_file)))


def load_public_key(cfg: SigningConfig):
    """The verifying key: ``$<cfg.public_key_env>``, ``cfg.public_key_file``, or derived from
    ``cfg.key_file`` on this machine.

    Raises:
        SignatureError: none of them is there, or the key is malformed.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    env = os.environ.get(cfg.public_key_env, "") if cfg.public_key_env else ""
    if env.strip():
        return Ed25519PublicKey.from_public_bytes(_decode_key(env, f"${cfg.public_key_env}"))
    if cfg.public_key_file and Path(cfg.public_key_file).is_file():
        return Ed25519PublicKey.from_public_bytes(_decode_key(Path(cfg.public_key_file).read_text(), cfg.public_key_file))
    if cfg.key_file and Path(cfg.key_file).is_file():
        return _private_from_raw(_decode_key(Path(cfg.key_file).read_text(), cfg.key_file)).public_key()
    raise SignatureError(f"no key to verify promotions: set ${cfg.public_key_env} (the pipeline's public key) "
                         f"or signing.public_key_file")


def key_id(public_key) -> str:
    """A short, stable name of a public key (sha256 of its raw bytes, 16 hex digits)."""
    return hashlib.sha256(_public_raw(public_key)).hexdigest()[:16]


def sign(private_key, model: str, version: int | str, onnx_sha256: str) -> dict[str, str]:
    """The tags to put on a promoted version: its signature and the signing key's id."""
    signature = private_key.sign(message(model, version, onnx_sha256))
    return {SIGNATURE_TAG: base64.b64encode(signature).decode("ascii"), KEY_ID_TAG: key_id(private_key.public_key())}


def verify(public_key, model: str, version: int | str, onnx_sha256: str, tags: dict[str, Any]) -> None:
    """Check a version's signature tag against the file's sha256 and the public key.

    Raises:
        SignatureError: unsigned, malformed, or not a signature of exactly this model, version
            and file by this key.
    """
    from cryptography.exceptions import InvalidSignature

    where = f"models:/{model}/{version}"
    text = str(tags.get(SIGNATURE_TAG) or "")
    if not text:
        raise SignatureError(f"{where} carries no promotion signature: it was not promoted by the pipeline "
                             "(radsynth promote); refusing to serve it")
    try:
        signature = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise SignatureError(f"{where}: its promotion signature is not base64; refusing to serve it") from None
    try:
        public_key.verify(signature, message(model, version, onnx_sha256))
    except InvalidSignature:
        signer = str(tags.get(KEY_ID_TAG) or "unknown")
        raise SignatureError(f"{where}: the promotion signature does not match this model file and version for key "
                             f"{key_id(public_key)} (signed by key {signer}); the registry entry or its file was "
                             "changed after promotion, or another key signed it; refusing to serve it") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radsynth.signing", description="promotion signing keys")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="write a new key pair (private 0600, public)")
    gen.add_argument("private", type=Path)
    gen.add_argument("public", type=Path)
    args = parser.parse_args(argv)
    if args.private.exists():
        print(f"{args.private} exists; not overwritten", file=sys.stderr)
        return 2
    _write_private(args.private)
    args.public.write_text(public_of(args.private.read_text()) + "\n")
    print(f"private key {args.private} (mount it only in the register step), public key {args.public}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
