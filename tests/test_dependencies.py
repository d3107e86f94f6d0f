"""Every pinned runtime dependency is used: imported by the project's code, or on a short list
of packages used without an import (each with the reason)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("radsynth", "model", "components", "serving", "pipelines")
# distribution -> import name, where they differ
IMPORT_NAME = {
    "torch-fidelity": "torch_fidelity", "kfp-kubernetes": "kfp.kubernetes", "nvidia-pytriton": "pytriton",
    "great-expectations": "great_expectations", "scikit-image": "skimage", "pyyaml": "yaml", "pillow": "PIL",
    "markdown-it-py": "markdown_it",
}
# used, but never imported by name
WITHOUT_IMPORT = {
    "protobuf": "the version kfp and tritonclient both accept (<7)",
    "onnxscript": "torch.onnx.export's dynamo exporter (export.dynamo)",
    "pylibjpeg-openjpeg": "pydicom's JPEG 2000 decoder plugin (ingest of compressed exports)",
    "dvc": "the `dvc` command (data pull, repro)",
    "torchvision": "torch-fidelity's dependency, pinned to the build that imports beside torch",
}


def _dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]


def _imported() -> set[str]:
    names = set()
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w, ]+)|import\s+([\w.]+))", path.read_text(), re.M):
                module = m.group(1) or m.group(3)
                parts = module.split(".")
                names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
                if m.group(1):                                            # from kfp import kubernetes
                    names.update(f"{module}.{n.strip()}" for n in m.group(2).split(",") if n.strip())
    return names


def test_every_pinned_dependency_is_used():
    imported = _imported()
    unused = [d for d in _dependencies() if d not in WITHOUT_IMPORT and IMPORT_NAME.get(d, d).replace("-", "_") not in imported]
    assert not unused, f"pinned in pyproject.toml but never imported: {unused}; drop them (and from requirements.lock)"


def test_the_lock_pins_every_direct_dependency_and_nothing_dropped():
    lock = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    missing = [d for d in _dependencies() if d not in lock]
    assert not missing, missing
    assert "dicognito" not in lock and "dicognito" not in _dependencies()     # pinned once, never used: dropped
