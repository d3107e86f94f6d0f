"""``radsynth``: one command line for every step.

Each subcommand lives in the module that implements it and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported only when
their subcommand runs, so ``radsynth --help`` stays fast. Every subcommand takes the
common options ``--params``, ``--profile``, ``--set key=value`` and ``--dry-run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from radsynth.config import Params, load_params, parse_override
from radsynth.errors import RadsynthError

# name -> (module, one-line help). Order is the order the data flows.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("components.ingest", "DICOM export + labels (or class folders) -> decoded, de-identified images + quarantine report"),
    "preprocess": ("components.preprocess", "ingest output -> dataset: progressive levels, patient-level split"),
    "validate": ("components.validate", "Great Expectations suite over the dataset; exit 1 on a failed expectation"),
    "train": ("components.train", "train the conditional GAN (all stages, or one with --stage); resumes from checkpoints"),
    "evaluate": ("components.evaluate", "metrics of G_ema (FID/KID, SSIM, memorisation, ...), the gate and its calibration; exits 1 when it fails (0 with --allow-fail)"),
    "export": ("components.export", "export G_ema to ONNX, check it and verify ONNX Runtime parity"),
    "register": ("components.register", "register the exported generator in MLflow as @candidate"),
    "promote": ("components.register", "move @champion to a version whose gate passed (default: @candidate)"),
    "rollback": ("components.register", "move @champion back to the previous champion"),
    "encoder": ("components.encoder", "train the image -> z encoder on the frozen G_ema, export ONNX, register it"),
    "serve": ("serving.server", "build the Triton model repository (registry alias or local ONNX) and run tritonserver"),
    "deploy": ("serving.deploy", "load the registry's @champion into a running Triton (health-checked), unload the old version; no restart"),
    "generate": ("serving.generate", "generate images from a running server as PNG or synthetic DICOM; --check verifies it"),
    "synthesize": ("components.synthesize", "a bulk synthetic dataset (N per condition or a mix) from a registry alias through Triton, with manifest + datasheet"),
    "web": ("serving.web.server", "run the web app (gunicorn) against Triton and the registry; prints its URL"),
    "study": ("serving.study", "reader study (visual Turing test) of one model version: create | list | report | close | reissue"),
    "pipeline": ("pipelines.cli", "the Kubeflow pipeline: compile | run-local | submit --host URL"),
}


def load_cli_params(args: argparse.Namespace) -> Params:
    """Resolve the config from the common options of a parsed command line."""
    overrides = dict(parse_override(item) for item in (args.set or []))
    return load_params(args.params, profile=args.profile, overrides=overrides)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command (without command-specific flags)."""
    parser = argparse.ArgumentParser(
        prog="radsynth",
        description="DICOM archive -> de-identified dataset -> conditional GAN -> evaluated, registered, served.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=None, help="params file (default: ./params.yaml or $RADSYNTH_PARAMS)")
        p.add_argument("--profile", default=None, help="profile overlay: tiny | cpu | gpu (default: params' own or $RADSYNTH_PROFILE)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one param, e.g. --set train.lr_g=2e-3 or --set seed=3 (repeatable)")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        subparsers[name] = p
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    # Only the chosen subcommand's module is imported (and only it adds its arguments).
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        module.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(load_cli_params(args).to_dict(), sort_keys=False), end="")
            return 0
        return int(module.run(args) or 0)
    except RadsynthError as exc:
        print(f"radsynth {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"radsynth {args.command}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
