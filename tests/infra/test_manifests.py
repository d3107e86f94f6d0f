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


# --------------------------------------------------------------------------------------
# A cluster that trusts no one
# --------------------------------------------------------------------------------------

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


def all_docs() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in vm.manifest_files() if f.parent.name == "k8s" for d in vm.load_documents(f)]


def pod_templates() -> list[tuple[str, str, dict]]:
    """``(where, namespace, pod template)`` of every pod the manifests create."""
    out = []
    for name, doc in all_docs():
        ns = doc["metadata"].get("namespace", "default")
        where = f"{name} {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOAD_KINDS:
            out.append((where, ns, doc["spec"]["template"]))
        elif doc["kind"] == "PyTorchJob":
            for role, replica in doc["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{where} {role}", ns, replica["template"]))
    return out


def test_manifests_have_the_pods_they_promise():
    wheres = " ".join(w for w, _, _ in pod_templates())
    for expected in ("Deployment/triton", "Deployment/mlflow", "StatefulSet/postgres", "Job/radsynth-dvc-pull",
                     "PyTorchJob/radsynth-train Master", "PyTorchJob/radsynth-train Worker"):
        assert expected in wheres


@pytest.mark.parametrize("where, ns, template", pod_templates(), ids=[w for w, _, _ in pod_templates()])
def test_every_pod_is_hardened_and_carries_no_service_account_token(where, ns, template):
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
    assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    assert spec.get("automountServiceAccountToken") is False, where
    accounts = {d["metadata"]["name"]: d for _, d in all_docs() if d["kind"] == "ServiceAccount"}
    account = accounts[spec["serviceAccountName"]]                       # a dedicated, declared account
    assert account["automountServiceAccountToken"] is False and account["metadata"]["namespace"] == ns
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, (where, container["name"])
        assert sc.get("readOnlyRootFilesystem") is True, (where, container["name"])
        assert sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")
        assert sc.get("privileged") is not True and sc.get("runAsNonRoot") is True
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, (where, container["name"], "a read-only root needs a writable /tmp")
        if container["image"].startswith("ghcr.io/radsynth/"):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("HOME", "").startswith("/tmp"), (where, container["name"])


def test_hardening_check_can_fail():
    template = copy.deepcopy(docs("triton.yaml")[0]["spec"]["template"])
    template["spec"]["containers"][0]["securityContext"] = {"runAsNonRoot": True}
    with pytest.raises(AssertionError):
        test_every_pod_is_hardened_and_carries_no_service_account_token("bad", "radsynth", template)


def test_namespace_enforces_the_restricted_pod_security_profile():
    (ns,) = docs("namespace.yaml")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- NetworkPolicy: evaluated, flow by flow ---------------------------------------------

NAMESPACES = {"radsynth": {"kubernetes.io/metadata.name": "radsynth"},
              "kubeflow": {"kubernetes.io/metadata.name": "kubeflow"},
              "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
              "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
              "clinic": {"kubernetes.io/metadata.name": "clinic", "radsynth.io/triton-clients": "true"},
              "other": {"kubernetes.io/metadata.name": "other"}}
EXTERNAL = ("external", {})


def _pods() -> dict[str, tuple[str, dict]]:
    pods = {where.split()[1].split("/")[1] + ("-" + where.split()[2].lower() if len(where.split()) > 2 else ""):
            (ns, t["metadata"]["labels"]) for where, ns, t in pod_templates()}
    pods.update({
        "kfp-step": ("kubeflow", {"pipelines.kubeflow.org/v2_component": "true"}),
        "minio": ("kubeflow", {"app": "minio"}),
        "prometheus": ("monitoring", {"app": "prometheus"}),
        "kube-dns": ("kube-system", {"k8s-app": "kube-dns"}),
        "web-app": ("clinic", {"app": "radsynth-web"}),
        "labelled-client": ("radsynth", {"radsynth.io/triton-client": "true"}),
        "stranger": ("radsynth", {"app": "debug-shell"}),
        "outsider": ("other", {"app": "whatever"}),
    })
    return pods


def _matches(selector: dict | None, labels: dict) -> bool:
    return selector is not None and all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(peer: dict, policy_ns: str, pod: tuple[str, dict] | tuple[str, str]) -> bool:
    ns, labels = pod
    if "ipBlock" in peer:
        return ns == "external"
    if ns == "external":
        return False
    ns_ok = _matches(peer["namespaceSelector"], NAMESPACES[ns]) if "namespaceSelector" in peer else ns == policy_ns
    pod_ok = _matches(peer["podSelector"], labels) if "podSelector" in peer else True
    return ns_ok and pod_ok


def _port_ok(rule: dict, port: int) -> bool:
    return "ports" not in rule or any(p.get("port") == port for p in rule["ports"])


def _allowed(direction: str, subject, peer, port: int, policies) -> bool:
    """Kubernetes semantics: not selected by any policy of this direction -> allowed; else some rule allows."""
    ns, labels = subject
    if ns not in ("radsynth",):  # only radsynth's own namespace is governed by these manifests
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [p for p in policies if p["metadata"]["namespace"] == ns and direction in p["spec"]["policyTypes"]
                 and _matches(p["spec"]["podSelector"], labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            if (peers not in rule or any(_peer_matches(x, ns, peer) for x in rule[peers])) and _port_ok(rule, port):
                return True
    return False


def flow(src: str, dst: str, port: int) -> bool:
    policies = docs("networkpolicy.yaml")
    pods = _pods()
    s = EXTERNAL if src == "external" else pods[src]
    d = EXTERNAL if dst == "external" else pods[dst]
    return _allowed("Egress", s, d, port, policies) and _allowed("Ingress", d, s, port, policies)


NEEDED = [("triton", "mlflow", 5000), ("mlflow", "postgres", 5432), ("mlflow", "minio", 9000), ("mlflow", "external", 443),
          ("kfp-step", "mlflow", 5000), ("radsynth-train-master", "mlflow", 5000),
          ("radsynth-train-master", "radsynth-train-worker", 23456), ("radsynth-train-worker", "radsynth-train-master", 29500),
          ("web-app", "triton", 8001), ("labelled-client", "triton", 8000), ("prometheus", "triton", 8002),
          ("radsynth-dvc-pull", "external", 443), ("triton", "kube-dns", 53), ("postgres", "kube-dns", 53)]
CLOSED = [("triton", "postgres", 5432), ("stranger", "mlflow", 5000), ("stranger", "triton", 8001), ("outsider", "triton", 8001),
          ("outsider", "mlflow", 5000), ("web-app", "mlflow", 5000), ("prometheus", "triton", 8001), ("web-app", "triton", 8002),
          ("radsynth-dvc-pull", "postgres", 5432), ("radsynth-dvc-pull", "mlflow", 5000), ("triton", "external", 443),
          ("postgres", "external", 443), ("radsynth-train-master", "postgres", 5432), ("external", "triton", 8001),
          ("mlflow", "triton", 8001), ("triton", "radsynth-train-master", 23456)]


@pytest.mark.parametrize("src, dst, port", NEEDED, ids=[f"{s}->{d}:{p}" for s, d, p in NEEDED])
def test_network_policies_open_each_flow_radsynth_needs(src, dst, port):
    assert flow(src, dst, port)


@pytest.mark.parametrize("src, dst, port", CLOSED, ids=[f"{s}->{d}:{p}" for s, d, p in CLOSED])
def test_network_policies_keep_everything_else_closed(src, dst, port):
    assert not flow(src, dst, port)


def test_default_deny_selects_every_pod_both_ways():
    deny = [p for p in docs("networkpolicy.yaml") if p["metadata"]["name"] == "default-deny"]
    assert deny and deny[0]["spec"]["podSelector"] == {} and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]


# --- Triton: restricted APIs, loopback elsewhere, signed champions only ----------------------


def test_triton_manifest_restricts_every_api_but_inference_health_metadata():
    from serving.server import ADMIN_APIS, OPEN_APIS, READ_APIS

    (triton,) = docs("triton.yaml")[0]["spec"]["template"]["spec"]["containers"]
    args = triton["args"]
    restricted = {}
    for flag in ("--grpc-restricted-protocol=", "--http-restricted-api="):
        for arg in (a for a in args if a.startswith(flag)):
            apis, _, header = arg[len(flag):].partition(":")
            for api in apis.split(","):
                restricted.setdefault(flag, {})[api] = header.split("=")[0]
    every = set(OPEN_APIS) | set(READ_APIS) | set(ADMIN_APIS)
    assert every == {"health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                     "statistics", "trace", "logging"}
    for flag, apis in restricted.items():
        assert set(apis) == every - set(OPEN_APIS), flag
        assert {apis[a] for a in READ_APIS} == {"radsynth-read-key"} and {apis[a] for a in ADMIN_APIS} == {"radsynth-admin-key"}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in triton["env"]}
    assert env == {"TRITON_READ_KEY": "radsynth-triton-keys", "TRITON_ADMIN_KEY": "radsynth-triton-keys"}
    assert "--model-control-mode=none" in args


def test_local_server_uses_the_same_restrictions():
    from serving.server import ADMIN_APIS, READ_APIS, restricted_api_flags

    flags = restricted_api_flags("r", "a")
    assert f"--grpc-restricted-protocol={','.join(READ_APIS)}:radsynth-read-key=r" in flags
    assert f"--http-restricted-api={','.join(ADMIN_APIS)}:radsynth-admin-key=a" in flags


def test_loopback_by_default_and_0000_only_in_manifests():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for profile in raw["profiles"]:
        p = load_params(ROOT / "params.yaml", profile=profile)
        assert p.serve.host == "127.0.0.1" and p.web.host == "127.0.0.1", profile
    assert 'MLFLOW_HOST:-127.0.0.1' in (ROOT / "mlflow" / "start-server.sh").read_text()
    assert "0.0.0.0" not in (ROOT / "params.yaml").read_text()


def test_only_signed_champions_reach_triton():
    deploy = docs("triton.yaml")[0]
    (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
    parsed = parse_radsynth(init["args"])
    overrides = dict(s.split("=", 1) for s in (parsed.set or []))
    assert load_params(ROOT / "params.yaml", profile=parsed.profile, overrides=overrides).signing.required is True
    env = {e["name"]: e for e in init["env"]}
    assert env["RADSYNTH_VERIFY_KEY"]["valueFrom"]["configMapKeyRef"]["name"] == "radsynth-signing-public"
    assert "RADSYNTH_SIGNING_KEY" not in env                        # the verifying side cannot sign
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "radsynth-mlflow-reader"


def test_only_the_register_step_mounts_the_signing_key():
    ir = list(yaml.safe_load_all((ROOT / "pipelines" / "radsynth_pipeline.yaml").read_text()))
    platform = next(d for d in ir if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    holders = {name for name, spec in platform.items()
               if any(s.get("secretName") == "radsynth-signing-key" or s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant") == "radsynth-signing-key"
                      for s in spec.get("secretAsEnv", []))}
    assert holders == {"exec-register"}


# --- MLflow behind authentication ---------------------------------------------------------


def test_mlflow_runs_behind_authentication():
    deploy = next(d for d in docs("mlflow.yaml") if d["kind"] == "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_APP_NAME"]["value"] == "basic-auth"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    config = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[str(Path(config).parent)]]["secret"]["secretName"] == "mlflow-auth"
    assert '--app-name "$MLFLOW_APP_NAME"' in (ROOT / "mlflow" / "start-server.sh").read_text()
    assert 'mlflow[auth]==3.17.2' in (INFRA / "mlflow.Dockerfile").read_text()
    for where, _, template in pod_templates():  # every MLflow client in the manifests authenticates
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            if "MLFLOW_TRACKING_URI" in names:
                assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names, where


def test_disruption_budgets_keep_triton_and_mlflow_serving():
    for name in ("triton", "mlflow"):
        pdbs = [d for _, d in all_docs() if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == name]
        (deploy,) = [d for _, d in all_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
        assert pdbs and pdbs[0]["spec"]["minAvailable"] >= 1
        assert pdbs[0]["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
        assert deploy["spec"]["replicas"] > pdbs[0]["spec"]["minAvailable"]  # a drain can still proceed
    hpa = next(d for d in docs("triton.yaml") if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2


def test_example_secrets_hold_no_value():
    secrets_ = [d for d in docs("secrets.example.yaml") if d["kind"] == "Secret"]
    assert {"radsynth-salt", "radsynth-signing-key", "radsynth-triton-keys", "mlflow-auth"} <= {s["metadata"]["name"] for s in secrets_}
    for secret in secrets_:
        assert "data" not in secret and "stringData" not in secret, secret["metadata"]["name"]
    assert "change-me" not in (INFRA / "k8s" / "secrets.example.yaml").read_text()


# --- .dockerignore: data, salt, keys, artefacts and runs never reach the builder -----------


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern (Go filepath.Match, ``**`` for any depth) excludes a path or any folder above it."""
    import re

    def regex(pattern: str) -> str:
        pattern = pattern.strip("/")
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if any(re.fullmatch(regex(body), p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [
    "data/dicom/GZ0000124/A20160077.dcm", "data/labels.csv", "elsewhere/export/study.dcm", ".radsynth-salt",
    "sub/.radsynth-salt", ".radsynth-signing-key", "artifacts/serve/triton-read.key", "artifacts/ingest/images.npy",
    "mlruns/mlflow.db", "mlruns/artifacts/1/abc/model.onnx", ".dvc/cache/ab/cdef", ".dvc/tmp/lock", ".env",
    "tests/artifacts/web_result.png", ".venv/bin/python", ".git/config", "benchmarks/results/soak.json",
])
def test_dockerignore_keeps_out(path):
    assert _ignored(path, _dockerignore_patterns())


def test_dockerignore_keeps_what_the_images_copy():
    patterns = _dockerignore_patterns()
    for name in ("Dockerfile", "mlflow.Dockerfile"):
        for word, args in _dockerfile_instructions(INFRA / name):
            if word == "COPY" and not any(a.startswith("--from=") for a in shlex.split(args)):
                for src in [p for p in shlex.split(args) if not p.startswith("--")][:-1]:
                    assert not _ignored(src.rstrip("/"), patterns), f"{name}: COPY {src} would be excluded"
                    if (ROOT / src).is_dir():
                        some = next(p for p in (ROOT / src).rglob("*.py")) if list((ROOT / src).rglob("*.py")) else None
                        if some is not None:
                            assert not _ignored(some.relative_to(ROOT).as_posix(), patterns)
    assert not _ignored("data.dvc", patterns) and not _ignored(".dvc/config", patterns)
    assert _ignored("data", ["data/"]) and not _ignored("data.dvc", ["data/"])  # the matcher can say no
