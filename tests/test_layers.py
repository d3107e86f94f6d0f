"""The code's shape, read from its imports (AST only, so these take seconds; docs/architecture.md).

* Imports go one way: ``radsynth`` <- ``model`` <- ``serving`` <- ``components`` <- ``pipelines``.
  Every import counts, at module level and inside functions.
* A plain ``radsynth <step>`` never loads kfp, and compiling the pipeline never loads torch.
* Each ``dvc.yaml`` stage lists exactly the project code its command runs: the modules its
  entry point imports, transitively (function-level imports included), less :data:`PLUMBING`.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a layer may import itself and any layer before it, never one after it
LAYERS = ("radsynth", "model", "serving", "components", "pipelines")
# Code every stage runs, left out of the stages' deps (each is asserted to be in every stage's
# closure): listed, any edit would rerun the whole pipeline from ingest.
PLUMBING = {
    "radsynth/cli.py": "the `radsynth` entry point every stage command goes through",
    "radsynth/config.py": "the typed config; the values a stage reads are its `params:`",
    "radsynth/errors.py": "the exception classes",
    "radsynth/io.py": "atomic writes and file hashes",
}


@dataclass(frozen=True)
class Import:
    file: Path                  # the importing file
    line: int
    module: str                 # the dotted module named (relative imports resolved)
    names: tuple[str, ...]      # `from module import names` (empty for `import module`)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the layers under ``root``."""
    out = {}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")) if (root / layer).is_dir() else []:
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_of(path: Path, module: str) -> list[Import]:
    """Every import in ``path``: statements anywhere in the file, ``importlib.import_module("x")``
    with a literal name, and ``["-m", "x"]`` command lines (a module run as a subprocess)."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                name = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.append(Import(path, node.lineno, name, tuple(alias.name for alias in node.names)))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(Import(path, node.lineno, node.args[0].value, ()))
        elif isinstance(node, ast.List):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found += [Import(path, node.lineno, values[i + 1], ()) for i in range(len(values) - 1)
                      if values[i] == "-m" and isinstance(values[i + 1], str)]
    return found


def layer_violations(root: Path) -> list[str]:
    """``file:line: from -> to (module)`` for every import against the layer order."""
    out = []
    for module, path in module_files(root).items():
        src = module.split(".")[0]
        for imp in imports_of(path, module):
            dst = imp.module.split(".")[0]
            if dst in LAYERS and LAYERS.index(dst) > LAYERS.index(src):
                out.append(f"{path.relative_to(root)}:{imp.line}: {src} -> {dst} ({imp.module})")
    return out


def test_imports_go_one_way():
    violations = layer_violations(ROOT)
    assert not violations, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(violations)


def test_the_layer_check_flags_an_upward_import_anywhere(tmp_path):
    """Failing control: upward imports at module level, in a function, relative or dynamic are all caught."""
    files = {
        "radsynth/__init__.py": "",
        "radsynth/bad.py": "import json\n\n\ndef helper():\n    from components.train import train\n    return train\n",
        "model/__init__.py": "from radsynth import bad\n",                         # downward: allowed
        "model/dyn.py": "import importlib\nPIPE = importlib.import_module('pipelines.cli')\n",
        "serving/__init__.py": "",
        "serving/run.py": "import subprocess, sys\nsubprocess.call([sys.executable, '-m', 'components.train'])\n",
        "components/__init__.py": "",
        "components/train.py": "from . import helper\nfrom serving import run\n",  # same layer, downward: allowed
        "components/helper.py": "",
        "pipelines/__init__.py": "",
        "pipelines/cli.py": "import components.train\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layer_violations(tmp_path)) == [
        "model/dyn.py:2: model -> pipelines (pipelines.cli)",
        "radsynth/bad.py:5: radsynth -> components (components.train)",
        "serving/run.py:2: serving -> components (components.train)",
    ]


def _loaded(code: str) -> list[list[str]]:
    """Run ``code`` in a fresh interpreter; each ``report(prefixes)`` call in it prints the loaded
    modules whose top-level package is one of ``prefixes``."""
    prelude = ("import json, sys\n"
               "def report(prefixes):\n"
               "    print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in prefixes)))\n")
    out = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]


def test_kfp_is_imported_only_by_the_pipeline_layer():
    """The static side of the next test (fast lane): no module outside pipelines/ names kfp."""
    found = [f"{path.relative_to(ROOT)}:{imp.line}" for module, path in module_files(ROOT).items()
             if not module.startswith("pipelines") for imp in imports_of(path, module) if imp.module.split(".")[0] == "kfp"]
    assert found == []


@pytest.mark.integration   # ~5 s: the step modules import torch
def test_a_plain_step_run_loads_neither_kfp_nor_the_pipeline():
    from radsynth.cli import COMMANDS

    steps = sorted({module for module, _ in COMMANDS.values() if module.startswith("components.")})
    code = "".join(f"import {m}\n" for m in ["radsynth.cli", *steps])
    code += "report(('kfp', 'pipelines'))\nimport pipelines.steps\nreport(('kfp',))\n"
    plain, control = _loaded(code)
    assert plain == [], f"importing the step modules loads {plain}"
    assert "kfp" in control   # the probe sees kfp once something does load it


def test_compiling_the_pipeline_loads_no_torch_and_no_step_code(tmp_path):
    code = ("from kfp import compiler\nfrom radsynth.config import load_params\n"
            "from pipelines.radsynth_pipeline import build_pipeline\n"
            f"compiler.Compiler().compile(build_pipeline(load_params('params.yaml', profile='gpu')), {str(tmp_path / 'p.yaml')!r})\n"
            "report(('torch', 'components', 'serving'))\n")
    (loaded,) = _loaded(code)
    assert loaded == [] and (tmp_path / "p.yaml").stat().st_size > 0


# --- DVC stages list exactly the code they run -------------------------------------------


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules loading it loads directly (packages on the way included), plus
    scripts it names beside itself (``Path(__file__).with_name("x.py")``: Triton's python backend)."""
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        edges = set()
        for imp in imports_of(path, module):
            for target in (imp.module, *(f"{imp.module}.{n}" for n in imp.names)):
                if target in files:
                    parts = target.split(".")
                    edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+\.py", node.value):
                script = path.parent / node.value
                if script.is_file():
                    edges.add(".".join(script.relative_to(root).with_suffix("").parts))
        graph[module] = edges - {module}
    return graph


def code_run_by(entry: str, graph: dict[str, set[str]], files: dict[str, Path]) -> set[str]:
    """Files (relative, non-empty) of ``entry`` and everything it loads, transitively."""
    seen, todo = set(), [entry, "radsynth.cli"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return {str(files[m].relative_to(ROOT)) for m in seen if files[m].stat().st_size > 0}


def dep_mismatch(code: frozenset[str], deps: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(code files no dep covers, {dep: the files it covers that the stage does not run})."""
    covered, extra = set(), {}
    for dep in deps:
        path = ROOT / dep
        files = ({str(p.relative_to(ROOT)) for p in path.rglob("*.py") if p.stat().st_size > 0} if path.is_dir()
                 else {dep})
        covered |= files
        if files - code:
            extra[dep] = sorted(files - code)
    return sorted(code - covered), extra


@functools.lru_cache(maxsize=None)
def stage_code() -> dict[str, tuple[frozenset[str], tuple[str, ...]]]:
    """dvc.yaml stage -> (the code its command runs less PLUMBING, its code deps)."""
    from radsynth.cli import COMMANDS

    files = module_files(ROOT)
    graph = import_graph(ROOT)
    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        entry = COMMANDS[stage["cmd"].split()[1]][0]
        code = code_run_by(entry, graph, files)
        assert set(PLUMBING) <= code, f"{name}: {sorted(set(PLUMBING) - code)} no longer run by every stage; list them as deps"
        deps = tuple(d for d in stage.get("deps", []) if d.split("/")[0] in LAYERS)
        out[name] = (frozenset(code - set(PLUMBING)), deps)
    return out


def test_each_dvc_stage_lists_exactly_the_code_it_runs():
    problems = []
    for name, (code, deps) in stage_code().items():
        missing, extra = dep_mismatch(code, deps)
        if missing:
            problems.append(f"{name}: missing deps {missing} (editing them would not rerun the stage)")
        for dep, files in extra.items():
            problems.append(f"{name}: dep {dep} covers {files}, which the stage never runs (editing them reruns it)")
    assert not problems, "dvc.yaml code deps:\n" + "\n".join(problems)


def test_the_dvc_dep_check_flags_a_coarse_and_a_missing_dep():
    """Failing control: train depending on all of model/ (the old dvc.yaml), evaluate without the judge."""
    stages = stage_code()
    code, deps = stages["train"]
    missing, extra = dep_mismatch(code, [d for d in deps if not d.startswith("model/")] + ["model"])
    assert missing == [] and {"model/judge.py", "model/metrics/families.py", "model/classifier.py"} <= set(extra["model"])
    code, deps = stages["evaluate"]
    missing, extra = dep_mismatch(code, [d for d in deps if d != "model/judge.py"])
    assert missing == ["model/judge.py"] and extra == {}


def test_the_trainer_runs_no_metric_judge_or_classifier_code():
    code, _ = stage_code()["train"]
    assert not {f for f in code if f.startswith(("model/metrics", "model/judge", "model/classifier", "model/calibration"))}
