"""Step ``export``: ``G_ema`` -> ONNX, checked, parity-tested against PyTorch, hashed.

The ONNX graph has inputs ``z`` [N, z_dim] float32 and ``class`` [N] int64 and output
``image`` [N, C, H, W] float32 in [-1, 1], a dynamic batch axis and the opset pinned in
``export.opset``. ``metadata_props`` carry ``classes`` (JSON list), ``z_dim``,
``img_resolution``, ``img_channels``, ``variant`` (and ``data_md5``, ``params_digest``).
At export time ``onnx.checker`` must pass and ONNX Runtime must reproduce PyTorch within
``export.parity_atol`` for the same ``z`` (``radsynth.latent.z_from_seed``), or nothing is
written. Outputs: ``<artifacts>/export/generator.onnx`` and ``export.json`` (with ``sha256``).

With ``--gate DIR`` (as ``dvc.yaml`` runs it) the step first reads the evaluation verdict
(``DIR/gate.json``): when the gate failed it exports nothing, removes a stale
``generator.onnx`` and writes ``export.json`` as ``{"refused": true, "reason": ...}``, so the
stage's output exists and the refusal is on record; it then exits 0 with ``--allow-refusal``
(DVC), else 1.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radsynth.config import ExportConfig, Params
from radsynth.errors import RadsynthError

STEP = "export"
INPUTS = ("z", "class")
OUTPUT = "image"


class ExportError(RadsynthError):
    """The exported graph is invalid or does not match PyTorch."""


class _GeneratorGraph(nn.Module):
    """Fixes the exported signature: ``(z, class) -> image``, clamped to [-1, 1]."""

    def __init__(self, G: nn.Module):
        super().__init__()
        self.G = G

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.G(z, c).clamp(-1.0, 1.0)  # [N, C, H, W]


def _torch_images(G: nn.Module, z: np.ndarray, c: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _GeneratorGraph(G).eval()(torch.from_numpy(z), torch.from_numpy(c)).float().numpy()


def parity(G: nn.Module, onnx_path: str | Path, classes: int, cfg: ExportConfig) -> dict:
    """Max |PyTorch - ONNX Runtime| over ``parity_batch`` images per condition (and batch 1).

    Returns:
        ``{"max_abs_diff": float, "images": int, "seed": int, "batch_sizes": [...]}``.
    """
    import onnxruntime as ort

    from radsynth.latent import z_from_seed

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n = max(1, cfg.parity_batch)
    z = z_from_seed(cfg.parity_seed, n * classes, int(G.z_dim))  # [n * classes, z_dim]
    c = np.repeat(np.arange(classes, dtype=np.int64), n)  # [n * classes]
    worst, batches = 0.0, []
    for zb, cb in ((z, c), (z[:1], c[:1])):  # the full batch and a batch of one (dynamic axis)
        ref = _torch_images(G, zb, cb)
        out = sess.run([OUTPUT], {"z": zb, "class": cb})[0]
        if out.shape != ref.shape or out.dtype != np.float32:
            raise ExportError(f"ONNX output {out.dtype} {out.shape} != PyTorch float32 {ref.shape}")
        worst = max(worst, float(np.max(np.abs(out - ref))))
        batches.append(int(len(zb)))
    return {"max_abs_diff": worst, "images": int(len(z)), "seed": cfg.parity_seed, "batch_sizes": batches, "atol": cfg.parity_atol}


def export_generator(G: nn.Module, meta: dict, path: str | Path, cfg: ExportConfig) -> dict:
    """Export ``G`` to ONNX at ``path`` (atomic) and verify it.

    Args:
        G: the generator (``G_ema``) at full resolution; attributes ``z_dim``, ``num_classes``,
            ``img_resolution``, ``img_channels``.
        meta: checkpoint meta (``classes``, ``variant``, ``data_md5``, ``params_digest``).
        path: target ``.onnx`` file.
        cfg: the ``export`` section (opset, exporter, parity tolerance).

    Returns:
        The export record (sha256, opset, parity, tensors, metadata) also written to ``export.json``.

    Raises:
        ExportError: the checker fails or the parity exceeds ``cfg.parity_atol`` (nothing is kept).
    """
    import onnx

    from radsynth.io import atomic_path, sha256_file

    G = G.eval()
    classes = list(meta.get("classes") or [str(i) for i in range(int(G.num_classes))])
    if len(classes) != int(G.num_classes):
        raise ExportError(f"meta lists {len(classes)} classes, the generator has num_classes={G.num_classes}")
    props = {"classes": json.dumps(classes), "z_dim": str(int(G.z_dim)), "img_resolution": str(int(G.img_resolution)),
             "img_channels": str(int(G.img_channels)), "variant": str(meta.get("variant", "unknown")),
             "data_md5": str(meta.get("data_md5", "unknown")), "params_digest": str(meta.get("params_digest", "unknown"))}
    z = torch.from_numpy(np.zeros((2, int(G.z_dim)), np.float32))
    c = torch.zeros(2, dtype=torch.int64)
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures raise
        kwargs = dict(input_names=list(INPUTS), output_names=[OUTPUT], opset_version=cfg.opset)
        if cfg.dynamo:
            batch = torch.export.Dim("N", min=1, max=4096)
            torch.onnx.export(_GeneratorGraph(G), (z, c), str(tmp), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch}, {0: batch}), **kwargs)
        else:
            torch.onnx.export(_GeneratorGraph(G), (z, c), str(tmp), dynamo=False,
                              dynamic_axes={"z": {0: "N"}, "class": {0: "N"}, OUTPUT: {0: "N"}}, **kwargs)
        proto = onnx.load(str(tmp))
        _pin_output_shape(proto, [int(G.img_channels), int(G.img_resolution), int(G.img_resolution)])
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset != cfg.opset:
            raise ExportError(f"the exporter wrote opset {opset}, export.opset pins {cfg.opset} "
                              "(the dynamo exporter needs opset >= 18; set export.opset or export.dynamo)")
        del proto.metadata_props[:]
        for key, value in props.items():
            proto.metadata_props.add(key=key, value=value)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the exported generator: {exc}") from None
        onnx.save(proto, str(tmp))
        check = parity(G, tmp, len(classes), cfg)
        if not check["max_abs_diff"] <= cfg.parity_atol:
            raise ExportError(f"ONNX Runtime differs from PyTorch by {check['max_abs_diff']:.3g} > export.parity_atol "
                              f"{cfg.parity_atol:g} for the same z; the export was not kept")
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        "step": STEP, "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
        "opset": cfg.opset, "exporter": "dynamo" if cfg.dynamo else "torchscript",
        "torch": torch.__version__, "onnx": onnx.__version__, "inputs": {t.name: _shape(t) for t in graph.input},
        "outputs": {t.name: _shape(t) for t in graph.output}, "metadata": props, "parity": check,
    }


def _pin_output_shape(proto, chw: list[int]) -> None:
    """Name the batch axis ``N`` and fix C, H, W (the TorchScript exporter leaves them symbolic)."""
    for out in proto.graph.output:
        if out.name != OUTPUT:
            continue
        dims = out.type.tensor_type.shape.dim
        while len(dims) < 4:
            dims.add()
        dims[0].Clear()
        dims[0].dim_param = "N"
        for d, v in zip(list(dims)[1:], chw):
            d.Clear()
            d.dim_value = v


def _shape(t) -> dict:
    import onnx

    dims = [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
    return {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type).name, "shape": dims}


def export(params: Params, generator_path: str | Path | None = None, out_dir: str | Path | None = None,
           gate_dir: str | Path | None = None) -> dict:
    """Load ``G_ema`` and export it to ``<out_dir>/generator.onnx`` + ``export.json``.

    Args:
        params: resolved config.
        generator_path: default ``<artifacts>/train/G_ema.safetensors``.
        out_dir: default ``<artifacts>/export``.
        gate_dir: an evaluation folder whose verdict must have passed (``None``: not checked).

    Returns:
        The export record written to ``export.json`` (``{"refused": True, ...}`` when the gate failed).
    """
    from model.checkpoint import load_generator
    from radsynth.io import sha256_file, write_json

    art = Path(params.paths.artifacts)
    generator_path = Path(generator_path or art / "train" / "G_ema.safetensors")
    out_dir = Path(out_dir or art / STEP)
    if gate_dir is not None:
        from radsynth.gate import refusal

        refused = refusal(gate_dir, STEP)
        if refused is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "generator.onnx").unlink(missing_ok=True)
            write_json(out_dir / "export.json", refused)
            return refused
    if not generator_path.is_file():
        raise RadsynthError(f"{generator_path}: no trained generator; run `radsynth train` first or pass --generator")
    G, meta = load_generator(generator_path)
    record = export_generator(G, meta, out_dir / "generator.onnx", params.export)
    record["generator"] = str(generator_path)
    record["generator_sha256"] = sha256_file(generator_path)
    write_json(out_dir / "export.json", record)
    params.save(out_dir / "params.yaml")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default=None, help="G_ema checkpoint (default <artifacts>/train/G_ema.safetensors)")
    parser.add_argument("--out", default=None, help="output folder (default <artifacts>/export)")
    parser.add_argument("--gate", default=None, metavar="DIR",
                        help="evaluation folder (e.g. artifacts/evaluate): refuse, and record why, unless its gate passed")
    parser.add_argument("--allow-refusal", action="store_true", help="exit 0 when the gate refuses the export (DVC runs it so)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    record = export(load_cli_params(args), args.generator, args.out, args.gate)
    if record.get("refused"):
        print(f"export refused: {record['reason']}")
        return 0 if args.allow_refusal else 1
    print(f"exported {record['file']} sha256={record['sha256'][:16]}... opset {record['opset']} "
          f"parity max|diff|={record['parity']['max_abs_diff']:.2e} (<= {record['parity']['atol']:g})")
    return 0
