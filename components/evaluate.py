"""Step ``evaluate``: metrics of the trained ``G_ema`` and the gate that guards registration.

Writes under ``<artifacts>/evaluate/``:

* ``metrics.json``  flat ``{key: number}`` (DVC metrics; keys from radsynth.metric_keys)
* ``gate.json``     verdict, every check with value, threshold and margin, the failed ones
* ``gate.md``       the same for people: which check failed and by how much
* ``evaluate.json`` summary: verdict, protocol (extractor, weights hashes, sample counts,
  resize, seed), unavailable metrics with the reason, input hashes
* ``classifier.safetensors`` / ``classifier.onnx`` the domain classifier (registered later)
* ``params.yaml``   the resolved config

The CLI exits 1 when the gate fails (``eval.enforce``), so ``dvc repro`` stops before
``export``/``register``; Kubeflow reads the verdict (:func:`gate_verdict`) for ``dsl.If``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from radsynth import metric_keys as mk
from radsynth.config import EvalConfig, Params
from radsynth.errors import RadsynthError

STEP = "evaluate"


class GateFailed(RadsynthError):
    """The gate refused the generator (raised only where a caller asks for it)."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One gate check: ``value <op> threshold``."""

    name: str                            # e.g. "cond_acc/NORMAL"
    condition: str                       # class name, or "all"
    metric: str                          # metric key the value came from
    value: float | None                  # None: the metric could not be computed
    op: str                              # ">=" or "<=" or "=="
    threshold: float
    passed: bool
    detail: str                          # readable reason, "by how much"


@dataclasses.dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        """One line: passed, or the failed checks and by how much."""
        if self.passed:
            return f"gate passed ({len(self.checks)} checks)"
        return f"gate FAILED {len(self.failed)}/{len(self.checks)} checks: " + "; ".join(c.detail for c in self.failed)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failed": [c.name for c in self.failed],
                "checks": [dataclasses.asdict(c) for c in self.checks]}


def _check(name: str, condition: str, metric: str, value: float | None, op: str, threshold: float, what: str) -> Check:
    if value is None or not np.isfinite(value):
        return Check(name, condition, metric, None, op, threshold, False, f"{name}: not computed, so it cannot pass ({what})")
    ok = value >= threshold if op == ">=" else value <= threshold if op == "<=" else value == threshold
    if ok:
        detail = f"{name} = {value:.4g} {op} {threshold:.4g}"
    else:
        gap = abs(value - threshold)
        rel = f" ({gap / abs(threshold):.0%})" if threshold else ""
        if op == "<=":
            detail = f"{name} = {value:.4g} exceeds the limit {threshold:.4g} by {gap:.4g}{rel}: {what}"
        elif op == ">=":
            detail = f"{name} = {value:.4g} is {gap:.4g} below the minimum {threshold:.4g}{rel}: {what}"
        else:
            detail = f"{name} = {value:.4g}, expected {threshold:.4g}: {what}"
    return Check(name, condition, metric, float(value), op, float(threshold), bool(ok), detail)


def apply_gate(values: dict[str, float], classes: Sequence[str], cfg: EvalConfig,
               img_resolution: int | None = None, expected_resolution: int | None = None) -> GateResult:
    """Check the metrics against the thresholds of ``cfg``: every condition, and memorisation.

    Args:
        values: flat metrics from :func:`model.metrics.compute_metrics`.
        classes: condition names; each one must pass every per-condition check.
        cfg: the ``eval`` section (``gate_*`` thresholds).
        img_resolution: resolution the generator produced.
        expected_resolution: its declared final resolution (a generator still mid-schedule fails).

    Returns:
        The :class:`GateResult`.
    """
    checks: list[Check] = []
    if img_resolution is not None and expected_resolution is not None:
        checks.append(_check("resolution", "all", "img_resolution", float(img_resolution), "==", float(expected_resolution),
                             "the generator must output its final resolution"))
    for c in classes:
        key = lambda k, c=c: mk.per_class(k, c)  # noqa: E731
        # Relative to what the classifier achieves on real images of the condition: an absolute
        # accuracy demands more of conditions the classifier itself separates poorly.
        real_acc = values.get(key(mk.REAL_ACC))
        acc_min, why = cfg.gate_min_cond_acc, "the classifier does not recognise the requested condition"
        if cfg.gate_cond_acc_ratio > 0:
            relative = cfg.gate_cond_acc_ratio * real_acc if real_acc is not None and np.isfinite(real_acc) else float("inf")
            acc_min = max(acc_min, relative)
            why += (f" (the minimum is max({cfg.gate_min_cond_acc:g}, {cfg.gate_cond_acc_ratio:g} x its accuracy on real "
                    f"images {real_acc if real_acc is not None else float('nan'):.4g}))")
        checks.append(_check(key(mk.COND_ACC), c, key(mk.COND_ACC), values.get(key(mk.COND_ACC)), ">=", acc_min, why))
        ref = values.get(key(mk.FID_DOMAIN) + mk.REF_SUFFIX)
        limit = cfg.gate_max_fid_ratio * max(ref if ref is not None and np.isfinite(ref) else 0.0, cfg.gate_fid_floor)
        checks.append(_check(key(mk.FID_DOMAIN), c, key(mk.FID_DOMAIN), values.get(key(mk.FID_DOMAIN)), "<=", limit,
                             f"the limit is {cfg.gate_max_fid_ratio:g} x max(real-vs-real {ref if ref is not None else float('nan'):.4g}, floor {cfg.gate_fid_floor:g})"))
        checks.append(_check(key(mk.MS_SSIM_DIVERSITY), c, key(mk.MS_SSIM_DIVERSITY), values.get(key(mk.MS_SSIM_DIVERSITY)), "<=",
                             cfg.gate_max_diversity, "generated images of this condition are too alike: mode collapse"))
        if cfg.gate_min_recall > 0:
            checks.append(_check(key(mk.RECALL), c, key(mk.RECALL), values.get(key(mk.RECALL)), ">=", cfg.gate_min_recall,
                                 "the generated images cover too little of the real distribution"))
    for metric, space in ((mk.MEMORISATION_SHARE, "pixel"), (mk.MEMORISATION_SHARE_FEATURE, "feature")):
        checks.append(_check(metric, "all", metric, values.get(metric), "<=", cfg.gate_max_memorisation,
                             f"too many generated images are closer to a training image ({space} space) than the "
                             f"closest {cfg.memorisation_percentile:g}% of real test images are: memorisation"))
    return GateResult(passed=all(c.passed for c in checks), checks=tuple(checks))


def gate_markdown(gate: GateResult, values: dict[str, float], classes: Sequence[str], unavailable: dict[str, str]) -> str:
    """The gate report for people."""
    lines = [f"# Evaluation gate: {'PASSED' if gate.passed else 'FAILED'}", ""]
    if not gate.passed:
        lines += ["## Failed checks", ""] + [f"- {c.detail}" for c in gate.failed] + [""]
    lines += ["## Checks", "", "| check | value | rule | result |", "|---|---|---|---|"]
    for c in gate.checks:
        v = "n/a" if c.value is None else f"{c.value:.4g}"
        lines.append(f"| {c.name} | {v} | {c.op} {c.threshold:.4g} | {'pass' if c.passed else '**FAIL**'} |")
    keys = (mk.FID_DOMAIN, mk.KID_DOMAIN, mk.FID_INCEPTION, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST, mk.MS_SSIM_NEAREST,
            mk.MS_SSIM_DIVERSITY, mk.COND_ACC, mk.COND_CONF, mk.REAL_ACC, mk.TSTR_ACC, mk.TRTR_ACC,
            mk.MEMORISATION_SHARE, mk.MEMORISATION_SHARE_FEATURE)
    lines += ["", "## Metrics (generated | real-vs-real reference)", "",
              "| metric | overall | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]

    def cell(key: str) -> str:
        v, r = values.get(key), values.get(key + mk.REF_SUFFIX)
        text = "-" if v is None else f"{v:.4g}"
        return text + (f" ({r:.4g})" if r is not None else "")

    for k in keys:
        if k in unavailable:
            lines.append(f"| {k} | unavailable | " + " | ".join("" for _ in classes) + " |")
            continue
        lines.append(f"| {k} | {cell(k)} | " + " | ".join(cell(mk.per_class(k, c)) for c in classes) + " |")
    if unavailable:
        lines += ["", "## Unavailable", ""] + [f"- `{k}`: {why}" for k, why in sorted(unavailable.items())]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def sample_generator(G: torch.nn.Module, samples_per_class: int, num_classes: int, seed: int,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``samples_per_class`` uint8 images per condition (z from radsynth.latent.z_from_seed).

    Condition ``i`` uses ``z_from_seed(seed + i, samples_per_class, G.z_dim)``, so a condition's
    images do not depend on how many others are evaluated.

    Returns:
        ``(images uint8 [N, C, R, R], labels int64 [N])``.
    """
    from radsynth.dataset import to_uint8
    from radsynth.latent import z_from_seed

    G.eval()
    images, labels = [], []
    for i in range(num_classes):
        z = torch.from_numpy(z_from_seed(seed + i, samples_per_class, int(G.z_dim)))  # [n, z_dim]
        for start in range(0, samples_per_class, batch_size):
            zb = z[start:start + batch_size]
            c = torch.full((zb.shape[0],), i, dtype=torch.int64)
            images.append(to_uint8(G(zb, c).float().cpu().numpy()))  # [n, C, R, R]
        labels.append(np.full(samples_per_class, i, np.int64))
    return np.concatenate(images), np.concatenate(labels)


def classifier_for(real, cfg: EvalConfig, cache_dir: str | Path | None, progress: bool = False) -> Path:
    """The domain classifier for these real splits: reused from the cache, or trained and stored.

    The cache key is the data identity plus the classifier recipe, so a new data version or
    recipe retrains it; the same ones reuse it (and its cached features).
    """
    from model import classifier as clf

    recipe = {"steps": cfg.classifier_steps, "width": cfg.classifier_width, "work_resolution": cfg.classifier_resolution, "lr": cfg.classifier_lr,
              "batch": cfg.classifier_batch, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps({"data": real.identity, **recipe}, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else Path(".")
    path = root / f"classifier-{key}.safetensors"
    if path.is_file():
        return path
    model = clf.train_classifier(real.train, real.train_labels, len(real.classes), steps=cfg.classifier_steps,
                                 width=cfg.classifier_width, work_resolution=cfg.classifier_resolution, lr=cfg.classifier_lr, batch_size=cfg.classifier_batch,
                                 seed=cfg.seed, progress=progress)
    meta = {"classes": list(real.classes), "data_identity": real.identity, "recipe": recipe,
            "val_acc": clf.accuracy(model, real.val, real.val_labels),
            "test_acc": clf.accuracy(model, real.test, real.test_labels)}
    return clf.save_classifier(path, model, meta)


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    passed: bool
    gate: GateResult
    values: dict[str, float]
    unavailable: dict[str, str]
    out_dir: Path


def evaluate_images(generated: np.ndarray, gen_labels: np.ndarray, dataset_dir: str | Path, params: Params,
                    out_dir: str | Path, expected_resolution: int | None = None, extra: dict | None = None,
                    progress: bool = False) -> EvaluationResult:
    """Metrics + gate + reports for images already generated (the generator-free core).

    Args:
        generated: uint8 ``[N, C, R, R]``.
        gen_labels: ``[N]`` requested condition indices.
        dataset_dir: the prepared dataset (radsynth.dataset format); level ``R`` is used.
        params: resolved config (``eval`` section, ``paths``).
        out_dir: where the reports go.
        expected_resolution: the generator's declared final resolution (gated when given).
        extra: merged into ``evaluate.json`` (generator hash, meta).
        progress: progress bars.
    """
    from model import classifier as clf
    from model.metrics import compute_metrics, describe, json_safe, real_splits
    from radsynth.dataset import load_dataset
    from radsynth.io import atomic_write_text, write_json

    cfg = params.eval
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    dataset = load_dataset(dataset_dir)
    res = int(generated.shape[-1])
    real = real_splits(dataset, res)
    cache_dir = Path(cfg.cache_dir or Path(params.paths.artifacts) / "cache")
    clf_path = classifier_for(real, cfg, cache_dir, progress)
    result = compute_metrics(generated, gen_labels, real, clf_path, cfg, cache_dir=cache_dir, progress=progress)
    gate = apply_gate(result.values, real.classes, cfg, res, expected_resolution)
    values = dict(result.values)
    values[mk.GATE_PASSED] = 1.0 if gate.passed else 0.0

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clf_path, out_dir / "classifier.safetensors")
    model, clf_meta = clf.load_classifier(clf_path)
    clf.export_classifier_onnx(model, out_dir / "classifier.onnx", real.classes, opset=params.export.opset)
    write_json(out_dir / "metrics.json", json_safe(values))
    write_json(out_dir / "gate.json", gate.to_dict())
    atomic_write_text(out_dir / "gate.md", gate_markdown(gate, values, real.classes, result.unavailable))
    write_json(out_dir / "evaluate.json", {
        "step": STEP, "passed": gate.passed, "summary": gate.summary(), "classes": list(real.classes),
        "unavailable": result.unavailable, "protocol": result.protocol,
        "classifier": {k: v for k, v in clf_meta.items() if k != "recipe"} | {"file": "classifier.safetensors", "onnx": "classifier.onnx"},
        "dataset": str(dataset_dir), "seconds": round(time.perf_counter() - t0, 2), **(extra or {}),
    })
    params.save(out_dir / "params.yaml")
    if progress:
        print(describe(values, real.classes))
    return EvaluationResult(gate.passed, gate, values, result.unavailable, out_dir)


def evaluate(params: Params, generator_path: str | Path | None = None, dataset_dir: str | Path | None = None,
             out_dir: str | Path | None = None, progress: bool = False) -> EvaluationResult:
    """Evaluate the trained ``G_ema``: sample it, compute every metric, apply the gate, write reports.

    Args:
        params: resolved config.
        generator_path: ``G_ema`` checkpoint (default ``<artifacts>/train/G_ema.safetensors``).
        dataset_dir: prepared dataset (default ``<artifacts>/dataset``).
        out_dir: reports (default ``<artifacts>/evaluate``).
        progress: progress bars and a summary table.

    Returns:
        :class:`EvaluationResult`; ``passed`` is the gate verdict.
    """
    from model.checkpoint import load_generator
    from radsynth.io import sha256_file

    art = Path(params.paths.artifacts)
    generator_path = Path(generator_path or art / "train" / "G_ema.safetensors")
    dataset_dir = Path(dataset_dir or art / "dataset")
    out_dir = Path(out_dir or art / STEP)
    if not generator_path.is_file():
        raise RadsynthError(f"{generator_path}: no trained generator; run `radsynth train` first or pass --generator")
    G, meta = load_generator(generator_path)
    classes = list(meta.get("classes") or [])
    from radsynth.dataset import load_dataset

    ds_classes = load_dataset(dataset_dir).classes
    if classes and classes != ds_classes:
        raise RadsynthError(f"the generator was trained on classes {classes}, the dataset has {ds_classes}; evaluate with its own dataset")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.eval.seed)
        images, labels = sample_generator(G, params.eval.samples_per_class, len(ds_classes), params.eval.seed, params.eval.batch_size)
    extra = {"generator": {"path": str(generator_path), "sha256": sha256_file(generator_path),
                           "variant": meta.get("variant"), "data_md5": meta.get("data_md5"),
                           "params_digest": meta.get("params_digest")}}
    return evaluate_images(images, labels, dataset_dir, params, out_dir,
                           expected_resolution=int(getattr(G, "img_resolution", meta.get("img_resolution", images.shape[-1]))),
                           extra=extra, progress=progress)


def gate_verdict(out_dir: str | Path) -> str:
    """``"passed"`` or ``"failed"`` from ``gate.json`` (for Kubeflow ``dsl.If``)."""
    path = Path(out_dir) / "gate.json"
    if not path.is_file():
        raise RadsynthError(f"{path}: no gate report; run `radsynth evaluate` first")
    return "passed" if json.loads(path.read_text()).get("passed") else "failed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default=None, help="G_ema checkpoint (default <artifacts>/train/G_ema.safetensors)")
    parser.add_argument("--dataset", default=None, help="prepared dataset (default <artifacts>/dataset)")
    parser.add_argument("--out", default=None, help="report folder (default <artifacts>/evaluate)")
    parser.add_argument("--allow-fail", action="store_true",
                        help="exit 0 even when the gate fails (Kubeflow branches on gate.json instead)")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    result = evaluate(params, args.generator, args.dataset, args.out, progress=True)
    print(result.gate.summary())
    print(f"reports: {result.out_dir / 'gate.md'}, {result.out_dir / 'metrics.json'}")
    for key, why in sorted(result.unavailable.items()):
        print(f"unavailable: {key}: {why}")
    if not result.passed and params.eval.enforce and not args.allow_fail:
        return 1
    return 0


# --------------------------------------------------------------------------------------
# Kubeflow component: the same function in the project image (pipelines/radsynth_pipeline.py)
# --------------------------------------------------------------------------------------
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output  # noqa: E402

from pipelines.component import step_component  # noqa: E402


@step_component
def evaluate_component(profile: str, overrides: list, dataset: Input[Dataset], checkpoint: Input[Model],
                       evaluation: Output[Artifact], metrics: Output[Metrics]) -> bool:
    """KFP: metrics and the gate on the last stage's ``G_ema``; returns the verdict for ``dsl.If``."""
    from components.evaluate import evaluate
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"dataset": dataset.path, "train": checkpoint.path},
                        outputs={"evaluate": evaluation.path}, metrics=metrics) as ws:
        result = evaluate(ws.params, progress=True)
        print(result.gate.summary())
    return bool(result.passed)
