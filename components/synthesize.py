"""Step ``synthesize``: a bulk synthetic dataset from a registered generator, through Triton.

    radsynth synthesize                         # synthesize.per_condition images of every condition, @champion
    radsynth synthesize --alias candidate --per-condition 2500 --format dicom
    radsynth synthesize --total 10000 --mix NORMAL=0.5,PNEUMONIA_VIRAL=0.5 --url triton:8001

The generator is resolved in the MLflow registry (``registry.champion_alias`` or ``--alias``, or one ``--version``),
its ONNX verified against the version's ``onnx_sha256`` tag, and a version whose gate did not
pass is refused. Images come from Triton over gRPC (:class:`serving.client.Client`), in
chunks of at most ``serve.max_images_per_call``: from the server at ``synthesize.url`` when
one is given (it must serve exactly that ONNX), else from a private ``tritonserver`` started
for this run on free local ports and stopped afterwards.

Latents: condition ``k`` (its index in the model's classes) uses seed ``synthesize.seed + k``
and its ``n`` latents are ``z_from_seed(seed, n, z_dim)``, the rows the chunks take in order,
so the images equal one ``radsynth generate --condition C -n n --seed seed`` of them all,
whatever the chunk size.

Writes ``<out>/`` (default ``<paths.artifacts>/synthesize``), atomically:

* ``images/<CONDITION>/...png`` or ``.dcm`` (synthetic Secondary Capture, one series per condition)
* ``manifest.csv``    one row per file: path, condition code and display name, seed, index, sha256
* ``datasheet.md`` / ``datasheet.json``  what the dataset is: model name/version, alias, ONNX
  sha256, seeds, counts, gate level and verdict, the model card's link, lineage, intended use
* ``params.yaml``     the resolved config
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from radsynth.config import Params, SynthesizeConfig
from radsynth.errors import RadsynthError

STEP = "synthesize"
FORMATS = ("png", "dicom")


class SynthesisError(RadsynthError):
    """The synthesis was refused or cannot be done (nothing was written)."""


def plan_counts(classes: Sequence[str], cfg: SynthesizeConfig) -> dict[str, int]:
    """Images per condition: ``per_condition`` each, or ``total`` split by ``mix`` (largest remainder).

    Raises:
        SynthesisError: the mix names an unknown condition, has a negative share or sums to 0.
    """
    unknown = sorted(set(cfg.mix) - set(classes))
    if unknown:
        raise SynthesisError(f"synthesize.mix names {unknown}, not conditions of this model ({', '.join(classes)})")
    if cfg.per_condition < 0 or cfg.total < 0:
        raise SynthesisError("synthesize.per_condition and synthesize.total must not be negative")
    total = cfg.total or cfg.per_condition * len(classes)
    if not cfg.mix and not cfg.total:
        return {c: cfg.per_condition for c in classes}
    shares = np.array([cfg.mix.get(c, 0.0) if cfg.mix else 1.0 for c in classes], dtype=np.float64)
    if (shares < 0).any() or shares.sum() <= 0:
        raise SynthesisError(f"synthesize.mix shares must be >= 0 and not all 0, got {dict(cfg.mix)}")
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return {c: int(n) for c, n in zip(classes, counts)}


def parse_mix(text: str) -> dict[str, float]:
    """``NORMAL=0.5,PNEUMONIA_VIRAL=0.5`` -> ``{"NORMAL": 0.5, ...}``."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SynthesisError(f"--mix {text!r}: expected CONDITION=share[,CONDITION=share...], e.g. NORMAL=0.5,PNEUMONIA_VIRAL=0.5")
    return out


@contextlib.contextmanager
def triton_client(params: Params, onnx_path: Path, url: str = "") -> Iterator:
    """A :class:`serving.client.Client` for the generator: at ``url``, or on a private tritonserver.

    The private server serves ``onnx_path`` alone (cpu flavour with nvidia-pytriton's binary,
    ``serve.flavour`` with a system tritonserver) on free ports, and is stopped on exit.
    """
    from serving.client import Client

    cfg = params.serve
    if url:
        with Client.from_params(params, url=url, protocol="grpc") as client:
            yield client
        return
    from serving.repository import build_repository
    from serving.server import TritonServer, find_tritonserver, free_port

    _, pytriton_dist = find_tritonserver()
    with tempfile.TemporaryDirectory(prefix="radsynth-synthesize-") as tmp:
        private = dataclasses.replace(
            cfg, models=(params.registry.model_name,), onnx={params.registry.model_name: str(onnx_path)}, repository=str(Path(tmp) / "repository"),
            flavour="cpu" if pytriton_dist is not None else cfg.flavour, host="127.0.0.1", url="", protocol="grpc",
            http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        repo = build_repository(dataclasses.replace(params, serve=private))
        with TritonServer(private, repo, log_path=Path(tmp) / "tritonserver.log"), Client.from_params(dataclasses.replace(params, serve=private)) as client:
            yield client


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def synthesize(params: Params, version: int | None = None, alias: str | None = None, url: str | None = None,
               out_dir: str | Path | None = None, fmt: str | None = None, progress: bool = False) -> dict:
    """Generate a synthetic dataset from a registered generator through Triton.

    Args:
        params: resolved config (``synthesize``, ``registry``, ``serve``, ``display_names``).
        version: a registered version (default: the one ``alias`` points at).
        alias: default ``registry.champion_alias``.
        url: Triton ``host:port`` serving that version (default ``synthesize.url``; "" starts a private server).
        out_dir: default ``synthesize.out`` or ``<paths.artifacts>/synthesize``.
        fmt: ``png`` or ``dicom`` (default ``synthesize.format``).
        progress: print one line per condition.

    Returns:
        The datasheet record (also ``datasheet.json``).

    Raises:
        SynthesisError: unknown format/mix, a version whose gate failed, or a server serving another ONNX.
        RadsynthError: the registry or Triton cannot be reached (their messages say why).
    """
    from radsynth.io import atomic_dir, sha256_file, write_json
    from radsynth.latent import z_from_seed
    from radsynth.registry import download_version, resolve_alias
    from radsynth.tracking import git_commit
    from serving.client import to_uint8

    cfg = params.synthesize
    fmt = fmt or cfg.format
    if fmt not in FORMATS:
        raise SynthesisError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    name = params.registry.model_name
    alias = alias or params.registry.champion_alias
    out_dir = Path(out_dir or cfg.out or Path(params.paths.artifacts) / STEP)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="radsynth-registry-") as download:
        if version is None:
            version, onnx_path, tags = resolve_alias(params, alias, name, download)
            origin = f"models:/{name}@{alias}"
        else:
            version, onnx_path, tags = download_version(params, int(version), name, download)
            origin = f"models:/{name}/{version}"
        if tags.get("gate") != "passed":
            raise SynthesisError(f"refusing to synthesize from {name} v{version}: its evaluation gate "
                                 f"{tags.get('gate', 'was never recorded')}; promote a version whose gate passed")
        classes = list(json.loads(tags.get("classes") or "[]"))
        counts = plan_counts(classes, cfg)
        body_part = params.data.allowed_body_parts[0] if len(params.data.allowed_body_parts) == 1 else ""
        rows: list[dict] = []
        with triton_client(params, onnx_path, cfg.url if url is None else url) as client, atomic_dir(out_dir) as tmp:
            info = client.info
            served = info.parameters.get("onnx_sha256", "")
            if served != tags.get("onnx_sha256"):
                raise SynthesisError(f"Triton at {client.url} serves {info.name} v{info.version} (onnx {served[:12]}...), not "
                                     f"{name} v{version} (onnx {str(tags.get('onnx_sha256'))[:12]}...); deploy it (`radsynth deploy`) "
                                     "or leave synthesize.url empty for a private server")
            if list(info.classes) != classes:
                raise SynthesisError(f"the served classes {list(info.classes)} differ from the registry's {classes}")
            chunk = max(1, min(params.serve.max_images_per_call, info.max_batch_size or params.serve.max_images_per_call))
            seeds = {c: cfg.seed + k for k, c in enumerate(classes)}
            for k, condition in enumerate(classes):
                n = counts[condition]
                if n == 0:
                    continue
                folder = tmp / "images" / condition
                folder.mkdir(parents=True)
                z = z_from_seed(seeds[condition], n, info.z_dim)                     # [n, z_dim]: one generate of n
                study_uid = series_uid = None
                if fmt == "dicom":
                    from pydicom.uid import generate_uid

                    study_uid, series_uid = generate_uid(), generate_uid()
                width = max(5, len(str(n - 1)))
                for start in range(0, n, chunk):
                    batch = z[start:start + chunk]
                    images = to_uint8(client.infer(batch, np.full(len(batch), k, dtype=np.int64)))  # [b, H, W, C]
                    if fmt == "dicom":
                        from serving.dicom_out import write_dicom_series

                        paths = write_dicom_series(images, folder, model_name=name, model_version=str(version),
                                                   seed=seeds[condition], condition=condition, body_part=body_part,
                                                   first_index=start, study_uid=study_uid, series_uid=series_uid)
                    else:
                        paths = []
                        for i, image in enumerate(images, start=start):
                            path = folder / f"{condition}_{seeds[condition]}_{i:0{width}d}.png"
                            path.write_bytes(_png(image))
                            paths.append(path)
                    for i, path in enumerate(paths, start=start):
                        rows.append({"file": path.relative_to(tmp).as_posix(), "condition": condition,
                                     "display_name": params.display_name(condition), "class_index": k,
                                     "seed": seeds[condition], "index": i, "sha256": sha256_file(path)})
                if progress:
                    print(f"{condition}: {n} images (seed {seeds[condition]})", file=sys.stderr)
            with open(tmp / "manifest.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["file"])
                writer.writeheader()
                writer.writerows(rows)
            record = {
                "step": STEP, "synthetic": True, "research_use_only": True,
                "model": name, "version": int(version), "origin": origin, "onnx_sha256": tags.get("onnx_sha256"),
                "served_by": client.url if (cfg.url if url is None else url) else "private tritonserver (this run)",
                "format": fmt, "img_resolution": info.img_resolution, "img_channels": info.img_channels,
                "counts": counts, "seeds": seeds, "mix": dict(cfg.mix), "images": len(rows),
                "latents": "condition k: z_from_seed(synthesize.seed + k, n, z_dim), rows in index order",
                "classes": classes, "display_names": {c: params.display_name(c) for c in classes},
                "gate": tags.get("gate"), "gate_level": tags.get("gate_level", "unknown"),
                "gate_release_passed": tags.get("gate_release_passed", "unknown"),
                "model_card": tags.get("model_card", ""), "model_card_registry": f"models:/{name}/{version} (description)",
                "train_run_id": tags.get("train_run_id", "unknown"), "data_md5": tags.get("data_md5", "unknown"),
                "model_git_commit": tags.get("git_commit", "unknown"), "synthesis_git_commit": git_commit(),
                "params_digest": params.digest(), "seconds": round(time.perf_counter() - t0, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_json(tmp / "datasheet.json", record)
            (tmp / "datasheet.md").write_text(datasheet_markdown(record))
            params.save(tmp / "params.yaml")
    return record


def datasheet_markdown(record: Mapping) -> str:
    """The datasheet for people (the questions of "Datasheets for Datasets", answered from the record)."""
    show = record["display_names"]
    level = record["gate_level"]
    gate = f"{record['gate']} at {level} level" if level != "unknown" else f"{record['gate']} (level not recorded)"
    if level != "release":
        gate += ": not a release model"
    lines = [
        f"# Datasheet: synthetic images from {record['model']} v{record['version']}", "",
        "> **Research use only.** Every image is synthetic: generated by a model, showing no real patient, with no "
        "diagnostic meaning. Do not use it for diagnosis, treatment or any clinical decision.", "",
        "## Composition", "",
        f"{record['images']} {record['format'].upper()} images, {record['img_resolution']}x{record['img_resolution']} px, "
        f"{record['img_channels']} channel(s); `manifest.csv` lists each file with its condition, seed, index and sha256.", "",
        "| condition | code | images | latent seed |", "|---|---|---|---|",
        *(f"| {show[c]} | `{c}` | {record['counts'][c]} | {record['seeds'][c]} |" for c in record["classes"]), "",
        "## How it was made", "",
        f"- Generator: `{record['model']}` version {record['version']} ({record['origin']}), ONNX sha256 `{record['onnx_sha256']}`.",
        f"- Evaluation gate of that version: {gate}.",
        f"- Model card: `{record['model_card'] or 'not recorded'}` (also the description of {record['model_card_registry']}).",
        f"- Lineage: training run `{record['train_run_id']}`, data md5 `{record['data_md5']}`, model code `{record['model_git_commit']}`.",
        f"- Served by {record['served_by']} in chunks through the Triton gRPC client; latents: {record['latents']}. "
        f"Image i of a condition is image i of `radsynth generate --condition <code> -n <count> --seed <seed>`.",
        f"- Made {record['created']} in {record['seconds']} s by radsynth `{record['synthesis_git_commit']}`.", "",
        "## Uses", "",
        "- Intended: research on medical-imaging AI (augmentation, sharing without patient data, pipeline tests).",
        "- Not intended: clinical use, or as evidence of any finding; models trained on it must be validated on real data.",
        "- It reproduces the training export's population and label noise and no other; see the model card's limits.", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--alias", default=None, help="registry alias of the generator (default registry.champion_alias)")
    source.add_argument("--version", type=int, default=None, help="one registered version instead of an alias")
    parser.add_argument("-n", "--per-condition", type=int, default=None, help="images per condition (default synthesize.per_condition)")
    parser.add_argument("--total", type=int, default=None, help="images in all, split by --mix (default synthesize.total)")
    parser.add_argument("--mix", default=None, help="target mix, e.g. NORMAL=0.5,PNEUMONIA_VIRAL=0.5 (default: class-balanced)")
    parser.add_argument("--seed", type=int, default=None, help="base latent seed; condition k uses seed + k (default synthesize.seed)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="png or synthetic DICOM (default synthesize.format)")
    parser.add_argument("--url", default=None, help="a running Triton host:port serving that version (default: a private server)")
    parser.add_argument("--out", default=None, help="output folder (default <paths.artifacts>/synthesize)")
    parser.add_argument("--allow-refusal", action="store_true",
                        help="when <artifacts>/register/register.json records a refused registration (failed gate), "
                             "record the refusal in synthesize.json and exit 0 (DVC runs it so)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    changes = {k: v for k, v in {"per_condition": args.per_condition, "total": args.total, "seed": args.seed}.items() if v is not None}
    if args.mix is not None:
        changes["mix"] = parse_mix(args.mix)
    params = dataclasses.replace(params, synthesize=dataclasses.replace(params.synthesize, **changes))
    if args.allow_refusal:
        from radsynth.io import write_json

        reg = Path(params.paths.artifacts) / "register" / "register.json"
        registered = json.loads(reg.read_text()) if reg.is_file() else {}
        if registered.get("refused"):
            out = Path(args.out or params.synthesize.out or Path(params.paths.artifacts) / STEP)
            write_json(out / "synthesize.json", {"step": STEP, "refused": True, "images": 0, "reason": registered.get("reason", "")})
            print(f"synthesis refused, nothing written: {registered.get('reason', 'the registration was refused')}")
            return 0
    record = synthesize(params, version=args.version, alias=args.alias, url=args.url, out_dir=args.out, fmt=args.format,
                        progress=True)
    out = Path(args.out or params.synthesize.out or Path(params.paths.artifacts) / STEP)
    print(f"wrote {record['images']} synthetic {record['format']} images of {record['model']} v{record['version']} "
          f"(gate {record['gate']}, level {record['gate_level']}) to {out}: "
          + ", ".join(f"{c} {n}" for c, n in record["counts"].items()) + f"; datasheet {out / 'datasheet.md'}")
    return 0
