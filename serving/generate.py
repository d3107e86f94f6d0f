"""``radsynth generate``: images from a running Triton server, as PNG or synthetic DICOM.

    radsynth generate --condition PNEUMONIA -n 16 --seed 7 --out out/ [--format png|dicom]
    radsynth generate --condition NORMAL -n 10000 --out out/   # any n: chunked, written as it arrives
    radsynth generate --check            # verify a live server; exit 0 (all pass) or 1

Image ``i`` of a seed is the same whatever ``n`` and however the client splits the requests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radsynth.errors import RadsynthError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--condition", help="class name, one of the served model's classes")
    parser.add_argument("-n", type=int, default=1, help="number of images, any positive number (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="latent seed (default: a fresh random one, printed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--format", choices=("png", "dicom"), default="png", help="png (default) or synthetic DICOM")
    parser.add_argument("--url", default=None, help="Triton host:port (default: serve.url or serve.host + port)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default=None, help="default: serve.protocol (grpc)")
    parser.add_argument("--check", action="store_true", help="verify the live server (shapes, dtype, range, determinism); exit 0/1")


def write_pngs(images, out_dir: Path, condition: str, seed: int, start: int = 0) -> list[Path]:
    """uint8 ``[N, H, W, C]`` -> ``<condition>_<seed>_<start + i>.png`` (atomic)."""
    from PIL import Image

    from radsynth.io import atomic_path

    paths = []
    for index, image in enumerate(images, start):
        path = out_dir / f"{condition}_{seed}_{index:03d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")
        paths.append(path)
    return paths


class DicomSeries:
    """One synthetic study/series written chunk by chunk (indices continue across chunks)."""

    def __init__(self, out_dir: Path, *, model_name: str, model_version: str, seed: int, condition: str):
        import datetime as dt

        from pydicom.uid import generate_uid

        self.out_dir, self.seed, self.condition = out_dir, seed, condition
        self.model_name, self.model_version = model_name, model_version
        self.study_uid, self.series_uid = generate_uid(), generate_uid()
        self.now = dt.datetime.now(dt.timezone.utc)

    def write(self, images, start: int) -> list[Path]:
        from radsynth.io import atomic_path
        from serving.dicom_out import synthetic_dataset

        paths = []
        for index, image in enumerate(images, start):
            ds = synthetic_dataset(
                image, model_name=self.model_name, model_version=self.model_version, seed=self.seed,
                condition=self.condition, index=index, study_uid=self.study_uid, series_uid=self.series_uid, now=self.now,
            )
            path = self.out_dir / f"synthetic_{self.condition}_{self.seed}_{index:03d}.dcm"
            with atomic_path(path) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
            paths.append(path)
        return paths


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params
    from radsynth.io import write_json
    from serving.client import Client, ClientError

    client = Client.from_params(load_cli_params(args), url=args.url, protocol=args.protocol)
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
        from radsynth.latent import new_seed

        seed = new_seed() if args.seed is None else args.seed
        chunks = client.iter_generate(args.condition, args.n, seed)  # checks n, seed and condition before any file
        info = client.info
        dicom = DicomSeries(args.out, model_name=client.model_name, model_version=info.version, seed=seed,
                            condition=args.condition) if args.format == "dicom" else None
        paths: list[Path] = []
        for start, images in chunks:
            paths += dicom.write(images, start) if dicom else write_pngs(images, args.out, args.condition, seed, start)
        write_json(args.out / f"generate_{args.condition}_{seed}.json", {
            "condition": args.condition, "seed": seed, "n": len(paths), "format": args.format,
            "model_name": client.model_name, "model_version": info.version,
            "onnx_sha256": info.parameters.get("onnx_sha256", ""), "files": [p.name for p in paths],
            "synthetic": True,
        })
        print(f"wrote {len(paths)} {args.format} images of {args.condition} (seed {seed}, "
              f"{client.model_name} v{info.version}) to {args.out}", file=sys.stderr)
        return 0
    finally:
        client.close()
