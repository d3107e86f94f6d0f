"""Validate the Kubernetes manifests in ``infra/`` offline.

Core kinds are checked with ``kubernetes-validate`` (strict: an unknown field is an error)
against Kubernetes 1.37. Custom resources are checked against the ``openAPIV3Schema`` of the
CustomResourceDefinitions in ``infra/crds/`` (themselves validated as core kinds), and the
pod templates they embed against the Kubernetes PodTemplateSpec schema; a few rules the
Training Operator enforces at admission are checked too.

    python infra/validate_manifests.py            # every *.yaml under infra/k8s and infra/crds
    python infra/validate_manifests.py FILE...    # exit 0 when all valid, 1 otherwise
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

INFRA = Path(__file__).resolve().parent
K8S_VERSION = "1.37.0"
CRD_DIR = INFRA / "crds"
MANIFEST_DIRS = (INFRA / "k8s", CRD_DIR)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest file (anchors resolved)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict]:
    """``(apiVersion, kind) -> openAPIV3Schema`` of every CRD version in ``crd_dir``."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in load_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate_document(doc: dict[str, Any], schemas: dict[tuple[str, str], dict]) -> list[str]:
    """Errors of one manifest document (empty when valid)."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in schemas:
        errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in jsonschema.Draft7Validator(schemas[key]).iter_errors(doc)]
        if key == ("kubeflow.org/v1", "PyTorchJob") and not errors:
            errors += _pytorchjob_rules(doc)
        return errors
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    except SchemaNotFoundError:
        return [f"no schema for {key[0]} {key[1]}: add its CRD to {CRD_DIR.name}/"]
    return []


def _pytorchjob_rules(doc: dict[str, Any]) -> list[str]:
    errors = []
    for role, replica in doc["spec"]["pytorchReplicaSpecs"].items():
        where = f"spec.pytorchReplicaSpecs.{role}"
        if role == "Master" and replica.get("replicas", 1) != 1:
            errors.append(f"{where}.replicas: a PyTorchJob has exactly one Master")
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": replica["template"]}
        try:
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        except ValidationError as exc:
            path = ".".join(map(str, exc.absolute_path))
            errors.append(f"{where}.{path}: {exc.message}")
            continue
        names = [c.get("name") for c in replica["template"]["spec"]["containers"]]
        if "pytorch" not in names:
            errors.append(f"{where}.template: the Training Operator needs a container named 'pytorch' (found {names})")
    return errors


def validate_files(paths: Iterable[Path]) -> dict[str, list[str]]:
    """``"file#index kind/name" -> errors`` for every document of every file."""
    schemas = crd_schemas()
    report = {}
    for path in paths:
        for i, doc in enumerate(load_documents(path)):
            name = f"{path.name}#{i} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            report[name] = validate_document(doc, schemas)
    return report


def manifest_files() -> list[Path]:
    """Every manifest the project ships."""
    return sorted(p for d in MANIFEST_DIRS for p in d.glob("*.yaml"))


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or manifest_files()
    report = validate_files(paths)
    for name, errors in report.items():
        print(("ok     " if not errors else "INVALID") + f" {name}")
        for err in errors:
            print(f"        {err}")
    return 0 if all(not e for e in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
