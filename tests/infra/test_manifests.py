"""Every Kubernetes manifest in infra/ validates offline, and the validator catches real mistakes."""

import copy
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.component import image_ref
from radsynth.config import load_params

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_manifests", INFRA / "validate_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vm = _load_validator()
SCHEMAS = vm.crd_schemas()


def docs(name: str) -> list[dict]:
    return vm.load_documents(INFRA / "k8s" / name)


def errors_of(doc: dict) -> list[str]:
    return vm.validate_document(doc, SCHEMAS)


def test_every_manifest_is_valid():
    files = vm.manifest_files()
    kinds = {d["kind"] for f in files for d in vm.load_documents(f)}
    # the scale-out pieces the project promises are all there
    assert {"PyTorchJob", "Deployment", "Service", "HorizontalPodAutoscaler", "StatefulSet",
            "PersistentVolumeClaim", "CustomResourceDefinition"} <= kinds
    report = vm.validate_files(files)
    assert report and not {k: v for k, v in report.items() if v}


def test_validator_script_exit_status(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    doc = docs("triton.yaml")[0]
    doc["spec"]["replicas"] = "two"
    bad.write_text(yaml.safe_dump(doc))
    assert vm.main([str(bad)]) == 1
    assert "replicas" in capsys.readouterr().out
    assert vm.main([str(INFRA / "k8s" / "triton.yaml")]) == 0


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("spec", "replicas"), "two", "replicas"),                           # wrong type
        (("spec", "template", "spec", "containers", 0, "imagePullPolcy"), "Always", "imagePullPolcy"),  # typo (strict)
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "8000", "containerPort"),
    ],
)
def test_core_kinds_catch_mistakes(path, value, expected):
    doc = copy.deepcopy(docs("triton.yaml")[0])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errs = errors_of(doc)
    assert errs and any(expected in e for e in errs), errs


def test_pytorchjob_schema_and_operator_rules():
    job = docs("pytorchjob-train.yaml")[0]
    assert errors_of(job) == []

    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "Sometimes"
    assert any("Sometimes" in e for e in errors_of(bad))

    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpec"] = bad["spec"].pop("pytorchReplicaSpecs")   # typo in the CR's own field
    assert errors_of(bad)

    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert any("exactly one Master" in e for e in errors_of(bad))

    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert any("named 'pytorch'" in e for e in errors_of(bad))

    bad = copy.deepcopy(job)   # the embedded pod template is validated as a PodTemplateSpec
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"] = "lots"
    assert any("resources" in e for e in errors_of(bad))


def test_unknown_custom_resource_is_reported():
    doc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "x"}, "spec": {}}
    assert any("add its CRD" in e for e in errors_of(doc))


def test_pytorchjob_runs_radsynth_train_under_torchrun():
    job = docs("pytorchjob-train.yaml")[0]
    nproc = int(job["spec"]["nprocPerNode"])
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        (container,) = [c for c in replica["template"]["spec"]["containers"] if c["name"] == "pytorch"]
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert args[:3] == ["--module", "radsynth.cli", "train"], role
        # the GPU count per pod equals the processes per node
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
        # the arguments after the module are a valid `radsynth train` command line
        parsed = parse_radsynth(args[2:])
        assert parsed.command == "train" and parsed.profile == "gpu"


def parse_radsynth(argv: list[str]):
    """Parse a radsynth command line with the real CLI (its command's own flags included)."""
    import importlib

    from radsynth.cli import COMMANDS, build_parser

    assert argv[0] in COMMANDS, f"radsynth {argv[0]} is not a registered command"
    parser, subparsers = build_parser()
    importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(subparsers[argv[0]])
    parsed = parser.parse_args(argv)
    load_params(ROOT / "params.yaml", profile=parsed.profile,
                overrides=dict(s.split("=", 1) for s in (parsed.set or [])))
    return parsed


def test_triton_init_container_builds_the_gpu_repository_with_the_cli():
    deploy = docs("triton.yaml")[0]
    (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["radsynth"]
    parsed = parse_radsynth(init["args"])
    assert parsed.command == "serve" and parsed.build_only and parsed.flavour == "gpu"
    mount = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"]
    assert parsed.repository == mount
    (triton,) = deploy["spec"]["template"]["spec"]["containers"]
    assert f"--model-repository={mount}" in triton["args"]


def test_images_match_params():
    """Manifests run the image the pipeline is compiled for (pipeline.image:image_tag)."""
    expected = image_ref(load_params(ROOT / "params.yaml", profile="gpu").pipeline)
    name = expected.split(":")[0]
    seen = []
    for f in vm.manifest_files():
        for d in vm.load_documents(f):
            text = json.dumps(d)
            seen += [w.strip('",') for w in text.split() if w.strip('",').startswith(name + ":")]
    assert seen and set(seen) == {expected}


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf += (" " if buf else "") + line
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
         "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


@pytest.mark.parametrize("name", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfiles_parse_and_copy_existing_paths(name):
    instructions = _dockerfile_instructions(INFRA / name)
    words = [w for w, _ in instructions]
    assert set(words) <= KNOWN, set(words) - KNOWN
    assert words[0] in ("FROM", "ARG") and "FROM" in words
    stages = {a.split()[-1] for w, a in instructions if w == "FROM" and " AS " in a.upper()}
    for word, args in instructions:
        if word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            if any(a.startswith("--from=") for a in shlex.split(args)):
                continue
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} does not exist"
        if word in ("CMD", "ENTRYPOINT") and args.startswith("["):
            assert isinstance(json.loads(args), list)
    # nothing is installed at run time, and no floating tags
    froms = [a.split()[0] for w, a in instructions if w == "FROM"]
    assert all(":" in f and not f.endswith(":latest") for f in froms if f not in stages)
    # pip installs in the image are exact pins or the lock file
    for word, args in instructions:
        if word == "RUN" and "pip install" in args:
            assert "requirements.lock" in args or "==" in args or "--no-deps ." in args, args


def test_project_image_installs_the_lock_and_the_project():
    text = (INFRA / "Dockerfile").read_text()
    assert "pip install -r requirements.lock" in text and "pip install --no-deps ." in text
    for package in ("radsynth/", "model/", "components/", "pipelines/", "serving/"):
        assert f"COPY {package} {package}" in text
