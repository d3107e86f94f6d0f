"""Contracts that hold the seams together: one set of step names across DVC, Kubeflow and
components/; every params key a DVC stage names exists; every pipeline compiles."""

import re
from pathlib import Path

import pytest
import yaml

from pipelines.radsynth_pipeline import STEPS, build_pipeline, component
from radsynth.cli import COMMANDS
from radsynth.config import load_params

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
PROFILES = sorted(RAW["profiles"])
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def interpolate(text: str, profile: str) -> str:
    """DVC's ${...} templating against params.yaml with ``profile`` selected."""
    values = {**RAW, "profile": profile}

    def lookup(match):
        node = values
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_same_step_names_in_dvc_kfp_and_components(tmp_path):
    assert list(DVC["stages"]) == list(STEPS)
    for step in STEPS:
        assert (ROOT / "components" / f"{step}.py").is_file(), f"components/{step}.py missing"
        assert step in COMMANDS, f"`radsynth {step}` is not a CLI command"
        assert component(step).name == step
    from kfp import compiler

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_pipeline(load_params(ROOT / "params.yaml", profile="tiny")), str(path))
    ir = yaml.safe_load_all(path.read_text()).__next__()
    tasks = set(ir["root"]["dag"]["tasks"])
    for comp in ir["components"].values():
        tasks |= set(comp.get("dag", {}).get("tasks", {}))
    kfp_steps = {re.sub(r"-\d+$", "", t) for t in tasks if not t.startswith("condition")}
    assert kfp_steps == set(STEPS)


def test_every_step_has_its_kfp_component_beside_the_pipeline():
    """Per the layout: components/<step>.py = plain function + CLI; pipelines/steps.py = its KFP component."""
    from pipelines.steps import COMPONENTS

    assert list(COMPONENTS) == list(STEPS)
    for step in STEPS:
        comp = COMPONENTS[step]
        assert comp.component_spec.implementation.container.image.startswith(
            load_params(ROOT / "params.yaml").pipeline.image + ":")
        body = comp.component_spec.implementation.container.command[-1]
        assert f"from components.{step} import" in body, f"{step}_component does not call components/{step}.py"


@pytest.mark.parametrize("profile", PROFILES)
def test_dvc_params_keys_exist(profile):
    for name, stage in DVC["stages"].items():
        for entry in stage.get("params", []):
            keys = entry if isinstance(entry, str) else None
            assert keys is not None, f"{name}: params from another file are not used here"
            key = interpolate(keys, profile)
            assert has_key(RAW, key), f"dvc.yaml stage {name!r} names params key {key!r}, missing from params.yaml ({profile})"


def test_dvc_stages_run_their_step_with_the_selected_profile():
    for name, stage in DVC["stages"].items():
        assert stage["cmd"].split()[:4] == ["radsynth", name, "--profile", "${profile}"], stage["cmd"]


@pytest.mark.parametrize("profile", PROFILES)
def test_dvc_paths_resolve_and_deps_exist(profile):
    outs = set()
    for name, stage in DVC["stages"].items():
        for dep in stage.get("deps", []):
            dep = interpolate(dep, profile)
            produced = any(dep == o or dep.startswith(o + "/") for o in outs)
            assert produced or (ROOT / dep).exists(), f"{name}: dep {dep} is neither a source file nor an earlier output"
        for out in stage.get("outs", []):
            outs.add(interpolate(out if isinstance(out, str) else next(iter(out)), profile))
    artifacts = RAW["paths"]["artifacts"]
    for metric in DVC.get("metrics", []):
        assert interpolate(metric, profile).startswith(artifacts + "/evaluate/")


def test_training_params_only_invalidate_training_and_after():
    """A change under `train:`/`model:` must not rerun ingest, preprocess or validate."""
    before_train = ["ingest", "preprocess", "validate"]
    for name in before_train:
        for key in DVC["stages"][name].get("params", []):
            section = interpolate(key, "cpu").split(".")
            assert "train" not in section and "model" not in section, (name, key)
    train_keys = [interpolate(k, "cpu") for k in DVC["stages"]["train"]["params"]]
    assert {"train", "model", "profiles.cpu.train", "profiles.cpu.model"} <= set(train_keys)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pipeline_compiles(tmp_path, profile):
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(load_params(ROOT / "params.yaml", profile=profile)), str(tmp_path / "p.yaml"))
    assert (tmp_path / "p.yaml").stat().st_size > 0


def test_profiles_are_block_yaml_and_hold_only_what_they_change():
    """A profile lists the values it changes, one per line (no long flow-style lines); the only
    empty sections are those a DVC stage names as `profiles.${profile}.<section>` (DVC refuses a
    missing params key), and a section no stage names is never kept empty."""
    text = (ROOT / "params.yaml").read_text()
    block = text[text.index("\nprofiles:\n"):]
    long = [line for line in block.splitlines() if len(line.split("#")[0].rstrip()) > 70]
    assert not long, long
    flow = [line.strip() for line in block.splitlines() if re.search(r":\s*\{[a-z_]+:", line.split("#")[0])]
    assert not flow, f"flow-style mappings in profiles: {flow}"
    named = {entry.split(".")[2] for stage in DVC["stages"].values() for entry in stage.get("params", [])
             if isinstance(entry, str) and entry.startswith("profiles.${profile}.")}
    for profile, overlay in RAW["profiles"].items():
        for section, body in overlay.items():
            assert body or section in named, f"profiles.{profile}.{section} is empty and no DVC stage names it"


def _defaults_against_file(cls, default, raw: dict, prefix: str) -> list[str]:
    """``prefix.key: code X != file Y`` for every field of ``cls`` whose default (``default``: the
    enclosing default instance, when there is one) differs from the file's base value."""
    import dataclasses
    import typing

    from radsynth.config import _coerce

    drift = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if field.name not in raw:
            continue                                   # a key the file leaves out: the code's default is the only one
        if default is not None:
            code = getattr(default, field.name)
        elif field.default is not dataclasses.MISSING:
            code = field.default
        elif field.default_factory is not dataclasses.MISSING:
            code = field.default_factory()
        else:
            continue                                   # no default in the code: the file is the one source
        if dataclasses.is_dataclass(hints[field.name]):
            drift += _defaults_against_file(hints[field.name], code, raw[field.name] or {}, key + ".")
            continue
        in_file = _coerce(hints[field.name], raw[field.name], key, ROOT / "params.yaml")
        if code != in_file:
            drift.append(f"{key}: code {code!r} != params.yaml {in_file!r}")
    return drift


def test_every_dataclass_default_equals_the_base_value_in_params_yaml():
    """One source of defaults: where radsynth/config.py keeps a default, it is params.yaml's base value."""
    from radsynth.config import Params

    base = {k: v for k, v in RAW.items() if k not in ("profiles", "recipes")}
    drift = _defaults_against_file(Params, None, base, "")
    assert not drift, "\n".join(drift)
    # the check sees a drift, at the top and nested under a level's own default instance
    changed = {**base, "seed": base["seed"] + 1,
               "eval": {**base["eval"], "gate": {**base["eval"]["gate"], "demo": {**base["eval"]["gate"]["demo"], "max_fid_units": 3.0}}}}
    assert [d.split(":")[0] for d in _defaults_against_file(Params, None, changed, "")] == ["seed", "eval.gate.demo.max_fid_units"]
