"""``radsynth generate``: images from a running Triton server, as PNG or synthetic DICOM.

    radsynth generate --condition PNEUMONIA -n 16 --seed 7 --out out/ [--format png|dicom]
    radsynth generate --check            # verify a live server; exit 0 (all pass) or 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radsynth.errors import RadsynthError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--condition", help="class name, one of the served model's classes")
    parser.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="latent seed (default: a fresh random one, printed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--format", choices=("png", "dicom"), default="png", help="png (default) or synthetic DICOM")
    parser.add_argument("--url", default=None, help="Triton host:port (default: serve.url or serve.host + port)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=None, help="default: serve.protocol (grpc)")
    parser.add_argument("--check", action="store_true", help="verify the live server (shapes, dtype, range, determinism); exit 0/1")


def write_pngs(images, out_dir: Path, condition: str, seed: int) -> list[Path]:
    """uint8 ``[N, H, W, C]`` -> ``<condition>_<seed>_<i>.png`` (atomic)."""
    from PIL import Image

    from radsynth.io import atomic_path

    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{condition}_{seed}_{index:03d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params
    from radsynth.io import write_json
    from serving.client import Client, ClientError

    cfg = load_cli_params(args).serve
    client = Client.from_config(cfg, url=args.url, protocol=args.protocol)
    try:
        if args.check:
            try:
                results = client.check(seed=args.seed if args.seed is not None else 7)
            except ClientError as exc:
                print(f"FAIL  server: {exc}")
                return 1
            for name, ok, detail in results:
                print(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
            failed = sum(not ok for _, ok, _ in results)
            info = client.info
            print(f"{client.model_name} v{info.version} at {client.url}: {len(results) - failed}/{len(results)} checks passed")
            return 1 if failed else 0
        if not args.condition or args.out is None:
            raise RadsynthError("--condition and --out are required (or use --check)")
        sample = client.sample(args.condition, args.n, args.seed)
        if args.format == "dicom":
            from serving.dicom_out import write_dicom_series

            paths = write_dicom_series(
                sample.images, args.out, model_name=sample.model_name, model_version=sample.model_version,
                seed=sample.seed, condition=sample.condition,
            )
        else:
            paths = write_pngs(sample.images, args.out, sample.condition, sample.seed)
        write_json(args.out / f"generate_{sample.condition}_{sample.seed}.json", {
            "condition": sample.condition, "seed": sample.seed, "n": len(paths), "format": args.format,
            "model_name": sample.model_name, "model_version": sample.model_version,
            "onnx_sha256": client.info.parameters.get("onnx_sha256", ""), "files": [p.name for p in paths],
            "synthetic": True,
        })
        print(f"wrote {len(paths)} {args.format} images of {sample.condition} (seed {sample.seed}, "
              f"{sample.model_name} v{sample.model_version}) to {args.out}", file=sys.stderr)
        return 0
    finally:
        client.close()
