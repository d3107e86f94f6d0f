"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON sidecar.

Two kinds:

* **Generator** (:func:`save_generator` / :func:`load_generator`): ``<name>.safetensors``
  (G's state dict) + ``<name>.json`` (meta: ``classes``, ``variant``, ``z_dim``,
  ``img_resolution``, ``img_channels``, ``data_md5``, ``params_digest``, the ``model``
  config, and the weights' ``sha256``). This is what evaluation, export and serving read.
* **Training state** (:func:`save_state` / :func:`load_state`): any nested dict of tensors
  (network and optimiser states, RNG states) flattened to ``a/b/c`` keys in one safetensors
  file, plus a JSON document (step, schedule position, optimiser hyper-parameters, config,
  metric history).

Every file is written atomically; the JSON carries the sha256 of its safetensors file, so a
pair from two different saves is detected instead of silently mixed. A generator pair is
replaced as a unit (:func:`save_generator`): the previous pair is kept as a hard-linked
backup until both new files are in place; a reader that finds a mixed pair (a kill between
the two renames) reads the backup, and the next save restores it first, so the previous
generator is never lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from radsynth.config import ModelConfig
from radsynth.errors import RadsynthError
from radsynth.io import atomic_path, sha256_file, write_json

REQUIRED_META = ("classes", "variant", "z_dim", "img_resolution", "img_channels", "data_md5", "params_digest")


class CheckpointError(RadsynthError):
    """A checkpoint is missing, truncated, mismatched or from an incompatible model."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp))
        digest = sha256_file(tmp)
    return digest


def _load_tensors(path: Path, sidecar: dict, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing; re-run training or point at the right folder")
    expected = sidecar.get("sha256")
    if expected and sha256_file(path) != expected:
        raise CheckpointError(f"{path}: sha256 does not match its JSON sidecar (a partial or mixed copy); restore both files together")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_sidecar(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint is a .safetensors + .json pair")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


# Values of model keys added after the first checkpoints were written: a checkpoint that lacks
# one was built with the old behaviour, whatever today's default is.
LEGACY_MODEL_VALUES: dict[str, Any] = {"fade_after_output": False, "separate_label_norm": False,
                                       "d_embed_equalized": False, "light_resolutions": (),
                                       "class_modulation": False, "d_twin_classifier": False}


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild the typed ``model:`` section stored in a checkpoint."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"checkpoint model config has keys this code does not know: {unknown}")
    full = {**{k: v for k, v in LEGACY_MODEL_VALUES.items() if k not in values}, **values}
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in full.items()})


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


def save_generator(path: str | os.PathLike, G: nn.Module, meta: dict[str, Any]) -> Path:
    """Write G's weights (safetensors) and ``meta`` (JSON sidecar) atomically.

    Args:
        path: ``.../G_ema.safetensors`` (the sidecar is ``.../G_ema.json``).
        G: a generator built by :func:`model.registry.build_networks`.
        meta: at least ``classes``, ``data_md5``, ``params_digest``; the architecture keys
            (``variant``, ``z_dim``, ``num_classes``, ``img_resolution``, ``img_channels``,
            ``model``) are filled in from G.

    Returns:
        The safetensors path.
    """
    weights, sidecar = _paths(path)
    full = dict(meta)
    full.update(
        variant=G.variant,
        z_dim=int(G.z_dim),
        num_classes=int(G.num_classes),
        img_resolution=int(G.img_resolution),
        img_channels=int(G.img_channels),
        model=model_config_to_dict(G.model_cfg),
        format="radsynth-generator/1",
    )
    classes = full.get("classes")
    if not isinstance(classes, (list, tuple)) or len(classes) != G.num_classes:
        raise CheckpointError(f"meta['classes'] must list the {G.num_classes} class names, got {classes!r}")
    full["classes"] = list(classes)
    missing = [k for k in REQUIRED_META if k not in full]
    if missing:
        raise CheckpointError(f"generator meta lacks {missing}")
    weights.parent.mkdir(parents=True, exist_ok=True)
    repair_generator(weights)
    new_weights, new_sidecar = _pending(weights)
    full["sha256"] = _save_tensors(new_weights, dict(G.state_dict()))
    write_json(new_sidecar, full)
    _swap_pair(weights, sidecar, new_weights, new_sidecar)
    return weights


def _pending(weights: Path) -> tuple[Path, Path]:
    token = os.urandom(4).hex()
    return weights.with_name(f".{weights.stem}.new-{token}.safetensors"), weights.with_name(f".{weights.stem}.new-{token}.json")


def _backups(weights: Path) -> tuple[Path, Path]:
    return weights.with_name(f".{weights.stem}.prev.safetensors"), weights.with_name(f".{weights.stem}.prev.json")


def _pair_consistent(weights: Path, sidecar: Path) -> bool:
    try:
        return weights.is_file() and json.loads(sidecar.read_text()).get("sha256") == sha256_file(weights)
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _swap_pair(weights: Path, sidecar: Path, new_weights: Path, new_sidecar: Path) -> None:
    """Put a written pair in place of the current one; see :func:`repair_generator`."""
    bak_w, bak_s = _backups(weights)
    for p in (bak_w, bak_s):
        p.unlink(missing_ok=True)
    if _pair_consistent(weights, sidecar):
        os.link(weights, bak_w)          # the backup pair exists before anything is replaced
        os.link(sidecar, bak_s)
    os.replace(new_weights, weights)
    os.replace(new_sidecar, sidecar)     # from here the new pair is complete
    for p in (bak_w, bak_s):
        p.unlink(missing_ok=True)


def repair_generator(path: str | os.PathLike) -> bool:
    """Roll back an interrupted :func:`save_generator` at ``path`` (writers only).

    A kill between the two renames leaves the new weights beside the old sidecar; the
    backup pair (the previous generator) is then restored. Leftover temporary files go.
    Readers never call this (a concurrent save could be mid-swap); they read the backup.

    Returns:
        True when the backup was restored.
    """
    weights, sidecar = _paths(path)
    bak_w, bak_s = _backups(weights)
    restored = False
    if not _pair_consistent(weights, sidecar) and _pair_consistent(bak_w, bak_s):
        os.replace(bak_w, weights)
        os.replace(bak_s, sidecar)
        restored = True
    for p in (bak_w, bak_s, *weights.parent.glob(f".{weights.stem}.new-*")):
        p.unlink(missing_ok=True)
    return restored


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild G from a :func:`save_generator` pair (no unpickling).

    Returns:
        ``(G, meta)`` with G in eval mode on ``device`` at ``(img_resolution, alpha=1)``.

    Raises:
        CheckpointError: a file is missing or corrupt, or the weights do not fit the model.
    """
    from model.registry import build_networks

    weights, sidecar = _paths(path)
    bak_w, bak_s = _backups(weights)
    if sidecar.is_file() and not _pair_consistent(weights, sidecar) and _pair_consistent(bak_w, bak_s):
        weights, sidecar = bak_w, bak_s      # an interrupted save: the previous generator
    meta = _read_sidecar(sidecar)
    missing = [k for k in (*REQUIRED_META, "model") if k not in meta]
    if missing:
        raise CheckpointError(f"{sidecar}: meta lacks {missing}; not a radsynth generator checkpoint")
    cfg = model_config_from_dict(meta["model"])
    G, _ = build_networks(cfg, len(meta["classes"]), int(meta["img_channels"]), int(meta["img_resolution"]))
    state = _load_tensors(weights, meta, "cpu")
    try:
        G.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not fit a {meta['variant']} generator: {str(exc).splitlines()[0]}") from None
    G.set_stage(G.img_resolution, 1.0)
    return G.to(device).eval().requires_grad_(False), meta


# --------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------


def flatten_tensors(tree: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested dict/list into ``{"a/b": tensor}`` and a JSON-able skeleton.

    Tensors are replaced in the skeleton by ``{"__tensor__": "a/b"}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"unsupported key type {type(k)} at {key}")
                out[f"{type(k).__name__}:{k}"] = walk(v, f"{key}/{k}" if key else str(k))
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"unsupported value type {type(node).__name__} at {key}")

    skeleton = walk(tree, prefix)
    return tensors, skeleton


def unflatten_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        out = {}
        for tagged, v in skeleton.items():
            kind, _, k = tagged.partition(":")
            out[int(k) if kind == "int" else k] = unflatten_tensors(v, tensors)
        return out
    if isinstance(skeleton, list):
        return [unflatten_tensors(v, tensors) for v in skeleton]
    return skeleton


def save_state(path: str | os.PathLike, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """Save a training state atomically: tensors -> safetensors, the rest + ``info`` -> JSON.

    ``state`` may nest dicts/lists of tensors and plain values (optimizer state dicts,
    RNG states as uint8 tensors). ``info`` is JSON-only (step, config, history, ...).

    Crash safety: the tensors go to a fresh ``<stem>-<token>.safetensors``; the JSON
    (``<stem>.json``), replaced atomically afterwards, is the commit point that names it.
    A kill at any moment leaves the previous complete pair readable.

    Returns:
        The JSON path (what :func:`load_state` takes).
    """
    sidecar = Path(path).with_suffix(".json")
    stem = sidecar.stem
    weights = sidecar.with_name(f"{stem}-{os.urandom(6).hex()}.safetensors")
    tensors, skeleton = flatten_tensors(state)
    digest = _save_tensors(weights, tensors)
    write_json(sidecar, {"format": "radsynth-train-state/1", "tensors": weights.name, "sha256": digest, "state": skeleton, "info": info})
    for old in sidecar.parent.glob(f"{stem}-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return sidecar


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a :func:`save_state` checkpoint (its JSON path); returns ``(state, info)``."""
    sidecar = Path(path).with_suffix(".json")
    doc = _read_sidecar(sidecar)
    if doc.get("format") != "radsynth-train-state/1":
        raise CheckpointError(f"{sidecar}: not a radsynth training checkpoint")
    tensors = _load_tensors(sidecar.with_name(doc["tensors"]), doc, device)
    return unflatten_tensors(doc["state"], tensors), doc["info"]


def state_exists(path: str | os.PathLike) -> bool:
    return Path(path).with_suffix(".json").is_file()
