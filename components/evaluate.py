"""Step ``evaluate``: the judge, every metric of the trained ``G_ema``, the gate, and its calibration.

The judge (:mod:`model.judge`) is a domain classifier trained at the dataset's full resolution
on the real train split, early-stopped on real val, cached per data identity + ``eval.judge``.
Distances are read in *reference units*: a condition's domain FID divided by the FID of real
training images drawn with the generated set's count of that condition (mean over
``eval.reference_draws`` draws). The gate has two levels (``eval.gate``): ``release`` (base and
gpu profiles) and ``demo`` (the cpu profile's minutes-long model); ``passed`` is judged at the
profile's level and the release verdict is always reported beside it, so a demo-level model is
never labelled release. Calibration (``--calibrate`` or ``eval.calibrate``) runs the same gate on
sets built from real data (:mod:`model.calibration`: noise, blur, checkerboard, shuffled labels,
collapse, verbatim and shifted training images must fail; the real val split must pass).

Writes under ``<artifacts>/evaluate/``:

* ``metrics.json``  flat ``{key: number}`` (DVC metrics; keys from radsynth.metric_keys)
* ``gate.json``     the verdict (a contract other steps read):

  - ``passed`` (bool): every check passed at ``level``
  - ``level`` (``"release"`` | ``"demo"``): the level it was judged at (``eval.gate.level``)
  - ``release_passed`` (bool): the verdict at release level (equal to ``passed`` at release level)
  - ``failed`` (list of check names) and ``checks`` (name, condition, metric, value, op,
    threshold, passed, margin, detail) at ``level``; ``release``: the same three at release level
  - ``distances``: per condition ``fid_domain``, ``reference`` (mean), ``reference_sd``,
    ``units`` (= fid_domain / reference) and ``limits`` (max units per level)
  - ``judge``: its real test accuracy per condition and balanced
  - ``calibration``: ``{"ran": bool, "ok": {level: bool}}`` (the gate failed every must-fail set)
* ``gate.md``       the same for people: which check failed, by how much, how far from release
* ``evaluate.json`` summary: verdict, protocol (extractor, weights hashes, sample counts,
  references, seed), the judge's report, unavailable metrics with the reason, input hashes
* ``calibration.json`` + ``calibration.md`` (when calibration ran): one row per calibration
  set: expected and actual verdict per level, the deciding check and its margin, the
  distances; ``ok``; the ranking check (noise > blurred > real val, per condition)
* ``samples.png`` (per-condition grid), ``confusion.png`` (the judge on generated images),
  ``nearest.png`` (generated images closest to a training image, above it), ``report.html``
* ``classifier.safetensors`` / ``classifier.onnx`` the judge (registered later)
* ``params.yaml``   the resolved config

A failed gate is a recorded result: with ``--allow-fail`` (as ``dvc.yaml`` runs it) the CLI
exits 0 after writing the verdict, so ``dvc exp run`` keeps a failing experiment's metrics and
``export`` / ``encoder`` / ``register`` record their refusal (:func:`radsynth.gate.refusal`,
which reads ``gate.json`` without this module's heavy imports). Without it a failed gate exits 1
(``eval.enforce``). Kubeflow branches on the verdict the component returns, with ``dsl.If``.
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
from radsynth.config import GATE_LEVELS, EvalConfig, Params
from radsynth.errors import RadsynthError

STEP = "evaluate"
CALIBRATION_VERSION = 2                  # bump when the calibration sets change (invalidates cached rows)


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
    margin: float                        # signed room relative to the threshold (> 0 passes; -inf: not computed)
    detail: str                          # readable reason, "by how much"


@dataclasses.dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: tuple[Check, ...]
    level: str = "release"

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        """One line: passed, or the failed checks and by how much."""
        if self.passed:
            return f"gate passed at {self.level} level ({len(self.checks)} checks)"
        return (f"gate FAILED at {self.level} level, {len(self.failed)}/{len(self.checks)} checks: "
                + "; ".join(c.detail for c in self.failed))

    def to_dict(self) -> dict:
        return {"passed": self.passed, "level": self.level, "failed": [c.name for c in self.failed],
                "checks": [{**dataclasses.asdict(c), "margin": _finite(c.margin)} for c in self.checks]}


def _finite(v: float | None) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _check(name: str, condition: str, metric: str, value: float | None, op: str, threshold: float, what: str) -> Check:
    if value is None or not np.isfinite(value):
        return Check(name, condition, metric, None, op, threshold, False, float("-inf"),
                     f"{name}: not computed, so it cannot pass ({what})")
    scale = abs(threshold) if threshold else 1.0  # a zero threshold (a count): margin in units
    if op == "<=":
        ok, margin = value <= threshold, (threshold - value) / scale
    elif op == ">=":
        ok, margin = value >= threshold, (value - threshold) / scale
    else:
        ok = value == threshold
        margin = 0.0 if ok else -abs(value - threshold) / scale
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
    return Check(name, condition, metric, float(value), op, float(threshold), bool(ok), float(margin), detail)


def apply_gate(values: dict[str, float], classes: Sequence[str], cfg: EvalConfig, level: str | None = None,
               img_resolution: int | None = None, expected_resolution: int | None = None,
               extra: Sequence[Check] = ()) -> GateResult:
    """Check the metrics against the thresholds of one gate level: every condition, and memorisation.

    Args:
        values: flat metrics from :func:`model.metrics.compute_metrics`.
        classes: condition names; each one must pass every per-condition check.
        cfg: the ``eval`` section (``gate.<level>`` thresholds).
        level: ``release`` or ``demo`` (default ``cfg.gate.level``).
        img_resolution: resolution the generator produced.
        expected_resolution: its declared final resolution (a generator still mid-schedule fails).
        extra: checks on the evaluation itself (calibration, utility sanity), appended.

    Returns:
        The :class:`GateResult`.
    """
    level = level or cfg.gate.level
    t = cfg.gate.thresholds(level)
    checks: list[Check] = []
    if img_resolution is not None and expected_resolution is not None:
        checks.append(_check("resolution", "all", "img_resolution", float(img_resolution), "==", float(expected_resolution),
                             "the generator must output its final resolution"))
    for c in classes:
        key = lambda k, c=c: mk.per_class(k, c)  # noqa: E731
        # Relative to what the judge achieves on real images of the condition: an absolute
        # accuracy demands more of conditions the judge itself separates poorly.
        real_acc = values.get(key(mk.REAL_ACC))
        acc_min, why = t.min_cond_acc, "the judge does not recognise the requested condition"
        if t.cond_acc_ratio > 0:
            relative = t.cond_acc_ratio * real_acc if real_acc is not None and np.isfinite(real_acc) else float("inf")
            acc_min = max(acc_min, relative)
            why += (f" (the minimum is max({t.min_cond_acc:g}, {t.cond_acc_ratio:g} x its accuracy on real "
                    f"images {real_acc if real_acc is not None else float('nan'):.4g}))")
        checks.append(_check(key(mk.COND_ACC), c, key(mk.COND_ACC), values.get(key(mk.COND_ACC)), ">=", acc_min, why))
        fid, ref, sd = (values.get(key(mk.FID_DOMAIN) + s) for s in ("", mk.REF_SUFFIX, mk.REF_SD_SUFFIX))
        checks.append(_check(key(mk.FID_DOMAIN_UNITS), c, key(mk.FID_DOMAIN_UNITS), values.get(key(mk.FID_DOMAIN_UNITS)), "<=",
                             t.max_fid_units,
                             f"domain FID {_fmt(fid)} against {_fmt(ref)} +- {_fmt(sd)} for real training images of the same "
                             f"count (reference units: generated / real)"))
        checks.append(_check(key(mk.MS_SSIM_DIVERSITY), c, key(mk.MS_SSIM_DIVERSITY), values.get(key(mk.MS_SSIM_DIVERSITY)), "<=",
                             t.max_diversity, "generated images of this condition are too alike: mode collapse"))
        if t.min_recall > 0:
            checks.append(_check(key(mk.RECALL), c, key(mk.RECALL), values.get(key(mk.RECALL)), ">=", t.min_recall,
                                 "the generated images cover too little of the real distribution"))
    for metric, space in ((mk.MEMORISATION_SHARE, "pixel"), (mk.MEMORISATION_SHARE_FEATURE, "feature")):
        checks.append(_check(metric, "all", metric, values.get(metric), "<=", t.max_memorisation,
                             f"too many generated images are closer to a training image ({space} space) than the "
                             f"closest {cfg.memorisation_percentile:g}% of real test images are: memorisation"))
    checks += list(extra)
    return GateResult(passed=all(c.passed for c in checks), checks=tuple(checks), level=level)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def utility_check(values: dict[str, float], cfg: EvalConfig) -> Check | None:
    """The utility sanity check: TRTR within ``eval.utility.trtr_tolerance`` of the judge (None when not computed)."""
    if mk.TRTR_GAP not in values:
        return None
    return _check(mk.TRTR_GAP, "all", mk.TRTR_GAP, values[mk.TRTR_GAP], "<=", cfg.utility.trtr_tolerance,
                  "the utility classifiers reach much less than the judge on real images: they are not trained well "
                  "enough to measure anything, so this evaluation is invalid (fix eval.judge / eval.utility)")


def calibration_check(calibration: dict | None, level: str) -> Check | None:
    """Fails when the thresholds of ``level`` let a must-fail calibration set pass (or fail real val)."""
    if not calibration:
        return None
    wrong = [r["name"] for r in calibration["rows"] if not r["levels"][level]["as_expected"]]
    if not calibration.get("ranking", {}).get("ok", True):
        wrong.append("ranking (noise > blurred > real val)")
    return _check(f"calibration/{level}", "all", "calibration", float(len(wrong)), "==", 0.0,
                  f"at these thresholds the gate gives the wrong verdict on calibration sets {', '.join(wrong)} "
                  f"(calibration.md): it cannot be trusted to judge a generator; fix eval.gate.{level} or eval.judge")


def distances_in_units(values: dict[str, float], classes: Sequence[str], cfg: EvalConfig) -> dict[str, dict]:
    """Per condition: domain FID, its size-matched reference (mean, sd), units, and each level's limit."""
    out = {}
    for c in classes:
        k = mk.per_class(mk.FID_DOMAIN, c)
        out[c] = {"fid_domain": _finite(values.get(k)), "reference": _finite(values.get(k + mk.REF_SUFFIX)),
                  "reference_sd": _finite(values.get(k + mk.REF_SD_SUFFIX)),
                  "units": _finite(values.get(mk.per_class(mk.FID_DOMAIN_UNITS, c))),
                  "limits": {lvl: cfg.gate.thresholds(lvl).max_fid_units for lvl in GATE_LEVELS}}
    return out


def gate_record(gates: dict[str, GateResult], level: str, values: dict[str, float], classes: Sequence[str], cfg: EvalConfig,
                calibration: dict | None) -> dict:
    """``gate.json`` (see the module docstring)."""
    gate, release = gates[level], gates["release"]
    return {
        **gate.to_dict(),
        "release_passed": release.passed,
        "release": {k: v for k, v in release.to_dict().items() if k != "level"},
        "distances": distances_in_units(values, classes, cfg),
        "judge": {"real_balanced_acc": _finite(values.get(mk.REAL_BALANCED_ACC)),
                  "real_acc": {c: _finite(values.get(mk.per_class(mk.REAL_ACC, c))) for c in classes}},
        "calibration": {"ran": calibration is not None,
                        "ok": {lvl: calibration["ok_by_level"][lvl] and calibration["ranking"]["ok"] for lvl in GATE_LEVELS}
                        if calibration else {}},
    }


# --------------------------------------------------------------------------------------
# Reports for people
# --------------------------------------------------------------------------------------


def gate_markdown(gates: dict[str, GateResult], level: str, values: dict[str, float], classes: Sequence[str],
                  unavailable: dict[str, str], cfg: EvalConfig, calibration: dict | None = None) -> str:
    """The gate report: verdict at the profile's level, how far from release, checks, metrics beside the judge's accuracy."""
    gate, release = gates[level], gates["release"]
    head = f"# Evaluation gate: {'PASSED' if gate.passed else 'FAILED'} at {level} level"
    lines = [head, ""]
    if level != "release":
        lines += [f"This profile is judged at **{level}** level (`eval.gate.level`), a model trained in minutes. "
                  f"At **release** level it {'passes' if release.passed else '**fails**'}"
                  + ("" if release.passed else f" ({len(release.failed)} checks: " + ", ".join(c.name for c in release.failed) + ")")
                  + ": it is " + ("" if release.passed else "**not** ") + "a release-level model.", ""]
    if not gate.passed:
        lines += ["## Failed checks", ""] + [f"- {c.detail}" for c in gate.failed] + [""]
    lines += ["## Distances in reference units", "",
              "A condition's domain FID (generated vs real test) divided by the FID of real training images drawn with the "
              f"same count of that condition (mean +- sd over {cfg.reference_draws} draws). 1 means as close as real "
              "images of that size get.", "",
              "| condition | domain FID | real reference | units | " + " | ".join(f"{lv} limit" for lv in GATE_LEVELS) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(GATE_LEVELS)]
    for c, d in distances_in_units(values, classes, cfg).items():
        ref = f"{_fmt(d['reference'])} +- {_fmt(d['reference_sd'])}"
        lines.append(f"| {c} | {_fmt(d['fid_domain'])} | {ref} | **{_fmt(d['units'])}** | "
                     + " | ".join(f"{d['limits'][lv]:g}" for lv in GATE_LEVELS) + " |")
    bal = values.get(mk.REAL_BALANCED_ACC)
    lines += ["", "## The judge", "",
              f"Real test accuracy (balanced {_fmt(bal)}): "
              + ", ".join(f"{c} {_fmt(values.get(mk.per_class(mk.REAL_ACC, c)))}" for c in classes)
              + ". Condition accuracy of generated images is read against these.", ""]
    if calibration is not None:
        lines += ["## Calibration", "",
                  "The same gate on sets built from real data (`calibration.md`): "
                  + "; ".join(f"{lv} level {'fails every must-fail set and passes real val' if calibration['ok_by_level'][lv] else '**gives a wrong verdict**'}"
                              for lv in GATE_LEVELS)
                  + f"; distances rank noise > blurred > real val: {'yes' if calibration['ranking']['ok'] else '**no**'}.", ""]
    for lv in dict.fromkeys([level, "release"]):
        g = gates[lv]
        lines += [f"## Checks at {lv} level", "", "| check | value | rule | margin | result |", "|---|---|---|---:|---|"]
        for c in g.checks:
            v = "n/a" if c.value is None else f"{c.value:.4g}"
            lines.append(f"| {c.name} | {v} | {c.op} {c.threshold:.4g} | {_pct(c.margin)} | {'pass' if c.passed else '**FAIL**'} |")
        lines.append("")
    keys = (mk.FID_DOMAIN_UNITS, mk.FID_DOMAIN, mk.KID_DOMAIN, mk.FID_INCEPTION, mk.PRECISION, mk.RECALL, mk.SSIM_NEAREST,
            mk.MS_SSIM_NEAREST, mk.MS_SSIM_DIVERSITY, mk.COND_ACC, mk.COND_CONF, mk.REAL_ACC, mk.TSTR_ACC, mk.TRTR_ACC,
            mk.MEMORISATION_SHARE, mk.MEMORISATION_SHARE_FEATURE)
    lines += ["## Metrics (generated | real reference)", "",
              "| metric | overall | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|",
              "| judge real test accuracy | " + _fmt(bal) + " (balanced) | "
              + " | ".join(_fmt(values.get(mk.per_class(mk.REAL_ACC, c))) for c in classes) + " |"]

    def cell(key: str) -> str:
        v, r = values.get(key), values.get(key + mk.REF_SUFFIX)
        text = "-" if v is None else f"{v:.4g}"
        return text + (f" ({r:.4g})" if r is not None else "")

    for k in keys:
        if k in unavailable:
            lines.append(f"| {k} | unavailable | " + " | ".join("" for _ in classes) + " |")
            continue
        lines.append(f"| {k} | {cell(k)} | " + " | ".join(cell(mk.per_class(k, c)) for c in classes) + " |")
    if mk.TSTR_BALANCED_ACC in values:
        pm = lambda k: f"{values[k]:.3f} +- {values[k + mk.SD_SUFFIX]:.3f}"  # noqa: E731
        lines += ["", "## Utility (real test split; mean +- sd over seeds; reported, not gated)", "",
                  "| experiment | balanced accuracy | minority-condition recall |", "|---|---:|---:|",
                  f"| TSTR (train on generated) | {pm(mk.TSTR_BALANCED_ACC)} | |",
                  f"| TRTR (train on as many real images) | {pm(mk.TRTR_BALANCED_ACC)} | |",
                  f"| real subset alone | {pm(mk.AUG_REAL_BALANCED_ACC)} | {pm(mk.AUG_REAL_MINORITY_RECALL)} |",
                  f"| real subset + class-balancing generated | {pm(mk.AUG_BALANCED_ACC)} | {pm(mk.AUG_MINORITY_RECALL)} |",
                  "", f"TRTR is {values[mk.TRTR_GAP]:+.3f} below the judge (tolerance {cfg.utility.trtr_tolerance:g})."]
    if unavailable:
        lines += ["", "## Unavailable", ""] + [f"- `{k}`: {why}" for k, why in sorted(unavailable.items())]
    return "\n".join(lines) + "\n"


def _pct(margin: float) -> str:
    return "n/a" if not np.isfinite(margin) else f"{margin:+.0%}"


# --------------------------------------------------------------------------------------
# Sampling, calibration, evaluation
# --------------------------------------------------------------------------------------


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


_CALIBRATION_VALUES = (mk.FID_DOMAIN_UNITS, mk.COND_ACC, mk.MS_SSIM_DIVERSITY, mk.RECALL, mk.PRECISION)


def run_calibration(real, judge, cfg: EvalConfig, cache_dir: Path | None, progress: bool = False) -> dict:
    """Every calibration set through the metrics and both gate levels (see :mod:`model.calibration`).

    The sets' metrics depend on the data, the judge and the metric settings, not on the
    thresholds, so they are cached and the gate is re-applied on every call.

    Returns:
        The ``calibration.json`` record.
    """
    from model.calibration import calibration_sets
    from model.metrics import compute_metrics, json_safe
    from radsynth.io import write_json

    key_blob = {"version": CALIBRATION_VERSION, "data": real.identity, "judge": judge.meta.get("recipe"), "judge_file": judge.path.name,
                "cfg": {k: getattr(cfg, k) for k in ("samples_per_class", "seed", "kid_subsets", "kid_subset_size", "prc_neighborhood",
                                                      "diversity_pairs", "reference_draws", "memorisation_percentile",
                                                      "memorisation_shift")}}
    key = hashlib.sha256(json.dumps(key_blob, sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache = (Path(cache_dir) / f"calibration-{key}.json") if cache_dir else None
    t0 = time.perf_counter()
    rows_cached = bool(cache and cache.is_file())
    if rows_cached:
        stored = json.loads(cache.read_text())
        sets_meta, set_values = stored["sets"], stored["values"]
    else:
        sets_meta, set_values = [], []
        for s in calibration_sets(real, cfg.samples_per_class, cfg.seed):
            if progress:
                print(f"calibration: {s.name} ({len(s.labels)} images)", flush=True)
            result = compute_metrics(s.images, s.labels, real, judge.path, cfg, cache_dir=cache_dir, utility=False)
            sets_meta.append({"name": s.name, "description": s.description, "expect": s.expect,
                              "images": {c: int((s.labels == i).sum()) for i, c in enumerate(real.classes)}})
            set_values.append(json_safe(result.values))
        if cache is not None:
            write_json(cache, {"key": key_blob, "sets": sets_meta, "values": set_values})
    classes = list(real.classes)
    rows, ok_by_level = [], {lvl: True for lvl in GATE_LEVELS}
    for meta, raw in zip(sets_meta, set_values):
        values = {k: (float("nan") if v is None else v) for k, v in raw.items()}
        levels = {}
        for lvl in GATE_LEVELS:
            gate = apply_gate(values, classes, cfg, lvl)
            deciding = min(gate.checks, key=lambda c: c.margin)
            expect = meta["expect"].get(lvl)
            verdict = "pass" if gate.passed else "fail"
            as_expected = expect is None or expect == verdict
            ok_by_level[lvl] &= as_expected
            levels[lvl] = {"expect": expect, "verdict": verdict, "as_expected": as_expected, "margin": _finite(deciding.margin),
                           "deciding_check": deciding.name, "failed": [c.name for c in gate.failed]}
        shown = {mk.per_class(k, c): raw.get(mk.per_class(k, c)) for k in _CALIBRATION_VALUES for c in classes}
        shown.update({k: raw.get(k) for k in (mk.MEMORISATION_SHARE, mk.MEMORISATION_SHARE_FEATURE, mk.COND_ACC)})
        rows.append({**meta, "levels": levels, "values": shown})
    ranking = {}
    by_name = {r["name"]: r for r in rows}
    for c in classes:
        u = {n: by_name[n]["values"].get(mk.per_class(mk.FID_DOMAIN_UNITS, c)) for n in ("noise", "blurred", "real_val") if n in by_name}
        finite = all(v is not None for v in u.values()) and len(u) == 3
        ranking[c] = {**u, "ok": bool(finite and u["noise"] > u["blurred"] > u["real_val"])}
    ranking_ok = all(r["ok"] for r in ranking.values())
    must_fail = [r["name"] for r in rows if r["expect"].get("release") == "fail"]
    bal = (judge.report.get("test") or {}).get("balanced")
    summary = ("; ".join(f"{lvl} level: " + ("every verdict as expected" if ok_by_level[lvl] else "WRONG VERDICTS")
                         for lvl in GATE_LEVELS)
               + f" on {len(rows)} sets built from real data (must fail: {', '.join(must_fail)}; must pass: real_val); "
               + f"distances rank noise > blurred > real val: {'yes' if ranking_ok else 'no'}"
               + (f"; judge balanced accuracy on real test images {bal:.3f}" if isinstance(bal, (int, float)) else "") + ".")
    return {
        "summary": summary,
        "ok": all(ok_by_level.values()) and ranking_ok, "ok_by_level": ok_by_level,
        "ranking": {"ok": ranking_ok, "rule": "fid_domain_units: noise > blurred > real_val",
                    "per_condition": ranking},
        "rows": rows, "thresholds": dataclasses.asdict(cfg.gate), "classes": classes,
        "judge": judge.report, "cached": rows_cached, "seconds": round(time.perf_counter() - t0, 2),
    }


def calibration_markdown(cal: dict) -> str:
    """``calibration.md``: one row per set, both levels' verdicts with the deciding check and margin."""
    classes = cal["classes"]
    lines = ["# Gate calibration: " + ("every verdict as expected" if cal["ok"] else "**WRONG VERDICTS**"), "",
             "The gate run on image sets built from real data. Margin: the deciding check's signed room relative to its "
             "threshold (negative: fails by that much; for a set that must pass, the check closest to failing).", "",
             "| set | built from | " + " | ".join(f"{lv}: expected | {lv}: verdict (margin, check)" for lv in GATE_LEVELS)
             + " | fid units " + " / ".join(classes) + " | cond acc | memorisation px / feat |",
             "|---|---|" + "---|---|" * len(GATE_LEVELS) + "---|---:|---|"]
    for r in cal["rows"]:
        cells = []
        for lv in GATE_LEVELS:
            d = r["levels"][lv]
            mark = "" if d["as_expected"] else " **WRONG**"
            margin = "n/a" if d["margin"] is None else f"{d['margin']:+.0%}"
            cells += [d["expect"] or "-", f"{d['verdict']}{mark} ({margin}, {d['deciding_check']})"]
        v = r["values"]
        units = " / ".join(_fmt(v.get(mk.per_class(mk.FID_DOMAIN_UNITS, c))) for c in classes)
        lines.append(f"| {r['name']} | {r['description']} | " + " | ".join(cells)
                     + f" | {units} | {_fmt(v.get(mk.COND_ACC))} | {_fmt(v.get(mk.MEMORISATION_SHARE))} / "
                     f"{_fmt(v.get(mk.MEMORISATION_SHARE_FEATURE))} |")
    rk = cal["ranking"]
    lines += ["", f"Ranking ({rk['rule']}): " + ("holds" if rk["ok"] else "**does not hold**") + " for "
              + ", ".join(f"{c} ({_fmt(d.get('noise'))} > {_fmt(d.get('blurred'))} > {_fmt(d.get('real_val'))}"
                          + ("" if d["ok"] else " **no**") + ")" for c, d in rk["per_condition"].items()) + ".", ""]
    t = cal["judge"].get("test", {})
    if t:
        lines += [f"Judge real test accuracy: balanced {_fmt(t.get('balanced'))}; "
                  + ", ".join(f"{c} {_fmt(a)}" for c, a in t.get("per_class", {}).items()) + ".", ""]
    lines += ["Thresholds: " + json.dumps(cal["thresholds"]), ""]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    passed: bool                         # at the profile's level
    gate: GateResult                     # at the profile's level
    values: dict[str, float]
    unavailable: dict[str, str]
    out_dir: Path
    release_passed: bool = False
    calibration: dict | None = None
    level: str = "release"


def _cache_dir(params: Params) -> Path:
    return Path(params.eval.cache_dir or Path(params.paths.artifacts) / "cache")


def calibrate(params: Params, dataset_dir: str | Path | None = None, out_dir: str | Path | None = None,
              resolution: int | None = None, progress: bool = False) -> dict:
    """Calibration alone: the judge (trained or cached) and every calibration set; writes
    ``calibration.json`` and ``calibration.md`` to ``out_dir`` (default ``<artifacts>/evaluate``).

    Returns:
        The calibration record.
    """
    from model.judge import judge_for
    from model.metrics import real_splits
    from radsynth.dataset import load_dataset

    art = Path(params.paths.artifacts)
    dataset = load_dataset(Path(dataset_dir or art / "dataset"))
    res = resolution or params.train.final_resolution or params.data.img_resolution
    real = real_splits(dataset, res)
    judge = judge_for(real, params.eval, _cache_dir(params), progress)
    cal = run_calibration(real, judge, params.eval, _cache_dir(params), progress)
    out_dir = Path(out_dir or art / STEP)
    _write_calibration(out_dir, cal)
    cal["mlflow_run_id"] = _track_calibration(params, out_dir, cal)
    return cal


def _track_calibration(params: Params, out_dir: Path, cal: dict) -> str | None:
    """An MLflow run ``calibrate`` with the table, the record and one margin per set and level."""
    if not params.eval.tracking:
        return None
    import mlflow

    from radsynth.tracking import provenance, setup_mlflow

    setup_mlflow(params)
    with mlflow.start_run(run_name="calibrate", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({**provenance(params), "step": STEP, "calibration_ok": str(cal["ok"]).lower()})
        margins = {f"calibration_margin/{r['name']}/{lvl}": d["margin"] for r in cal["rows"] for lvl, d in r["levels"].items()
                   if d["margin"] is not None}
        mlflow.log_metrics({**margins, **{f"calibration_ok/{lvl}": float(ok) for lvl, ok in cal["ok_by_level"].items()}})
        for name in ("calibration.md", "calibration.json"):
            mlflow.log_artifact(str(out_dir / name), artifact_path=STEP)
        return run.info.run_id


def _write_calibration(out_dir: Path, cal: dict) -> None:
    from radsynth.io import atomic_write_text, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "calibration.json", cal)
    atomic_write_text(out_dir / "calibration.md", calibration_markdown(cal))


def evaluate_images(generated: np.ndarray, gen_labels: np.ndarray, dataset_dir: str | Path, params: Params,
                    out_dir: str | Path, expected_resolution: int | None = None, extra: dict | None = None,
                    progress: bool = False, calibrate: bool | None = None) -> EvaluationResult:
    """Judge + metrics + both gate levels + reports + pictures for images already generated.

    Args:
        generated: uint8 ``[N, C, R, R]``.
        gen_labels: ``[N]`` requested condition indices.
        dataset_dir: the prepared dataset (radsynth.dataset format); level ``R`` is used.
        params: resolved config (``eval`` section, ``paths``).
        out_dir: where the reports go.
        expected_resolution: the generator's declared final resolution (gated when given).
        extra: merged into ``evaluate.json`` (generator hash, meta).
        progress: progress bars.
        calibrate: run the calibration sets first (default ``eval.calibrate``).
    """
    from model import classifier as clf
    from model.judge import judge_for
    from model.metrics import compute_metrics, describe, json_safe, real_splits
    from radsynth.dataset import load_dataset
    from radsynth.io import atomic_write_text, write_json

    cfg = params.eval
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    dataset = load_dataset(dataset_dir)
    res = int(generated.shape[-1])
    real = real_splits(dataset, res)
    cache_dir = _cache_dir(params)
    judge = judge_for(real, cfg, cache_dir, progress)
    t_judge = time.perf_counter() - t0
    cal = run_calibration(real, judge, cfg, cache_dir, progress) if (cfg.calibrate if calibrate is None else calibrate) else None
    result = compute_metrics(generated, gen_labels, real, judge.path, cfg, cache_dir=cache_dir, progress=progress)
    values = dict(result.values)
    classes = list(real.classes)
    gates = {}
    for lvl in GATE_LEVELS:
        checks = [c for c in (calibration_check(cal, lvl), utility_check(values, cfg)) if c is not None]
        gates[lvl] = apply_gate(values, classes, cfg, lvl, res, expected_resolution, extra=checks)
    level = cfg.gate.level
    gate = gates[level]
    values[mk.GATE_PASSED] = 1.0 if gate.passed else 0.0
    values[mk.GATE_RELEASE_PASSED] = 1.0 if gates["release"].passed else 0.0

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("calibration.json", "calibration.md"):
        (out_dir / stale).unlink(missing_ok=True)
    if cal is not None:
        _write_calibration(out_dir, cal)
    shutil.copyfile(judge.path, out_dir / "classifier.safetensors")
    model, clf_meta = clf.load_classifier(judge.path)
    clf.export_classifier_onnx(model, out_dir / "classifier.onnx", real.classes, opset=params.export.opset)
    record = gate_record(gates, level, values, classes, cfg, cal)
    report = gate_markdown(gates, level, values, classes, result.unavailable, cfg, cal)
    write_json(out_dir / "metrics.json", json_safe(values))
    write_json(out_dir / "gate.json", record)
    atomic_write_text(out_dir / "gate.md", report)
    pictures = _write_pictures(out_dir, generated, gen_labels, real, result, gate, level)
    summary = {
        "step": STEP, "passed": gate.passed, "level": level, "release_passed": gates["release"].passed,
        "summary": gate.summary(), "classes": classes, "unavailable": result.unavailable, "protocol": result.protocol,
        "judge": {"cached": judge.cached, "train_seconds": judge.train_seconds, "file": "classifier.safetensors",
                  "onnx": "classifier.onnx", **{k: v for k, v in clf_meta.items() if k != "recipe"}, "recipe": clf_meta.get("recipe")},
        "calibration": None if cal is None else {"ok": cal["ok"], "ok_by_level": cal["ok_by_level"], "cached": cal["cached"]},
        "dataset": str(dataset_dir), "pictures": pictures,
        "seconds": round(time.perf_counter() - t0, 2), "seconds_judge": round(t_judge, 2), **(extra or {}),
    }
    params.save(out_dir / "params.yaml")
    summary["mlflow_run_id"] = _track(params, out_dir, values, gate, gates["release"].passed, extra)
    write_json(out_dir / "evaluate.json", summary)
    if progress:
        print(describe(values, real.classes))
    return EvaluationResult(gate.passed, gate, values, result.unavailable, out_dir, gates["release"].passed, cal, level)


def _write_pictures(out_dir: Path, generated: np.ndarray, gen_labels: np.ndarray, real, result, gate: GateResult, level: str) -> dict:
    """samples.png, confusion.png, nearest.png and report.html (all of them embedded)."""
    from model import figures
    from radsynth.io import atomic_path, atomic_write_text

    classes = list(real.classes)
    grid = figures.sample_grid(generated, gen_labels, classes)
    conf = figures.confusion_png(result.details["confusion"], classes)
    pairs, dists = figures.nearest_pairs(generated, real.train, result.details["nearest_train"], result.details["nearest_distance"])
    threshold = result.protocol["memorisation"]["threshold_pixel"]
    files = {"samples.png": grid, "confusion.png": conf, "nearest.png": pairs}
    for name, blob in files.items():
        with atomic_path(out_dir / name) as tmp:
            Path(tmp).write_bytes(blob)
    captions = {
        "Generated images, one row per condition (the first 8 of the evaluation set)": grid,
        "The judge on generated images: rows the requested condition, columns its prediction": conf,
        (f"The generated images closest to a training image (top) above that image (bottom): distances "
         + ", ".join(f"{d:.3f}" for d in dists) + f" (per-pixel RMS); memorisation threshold {threshold:.3f}, "
         "the closest real test images' distance"): pairs,
    }
    page = figures.report_html(f"radsynth evaluation: {'passed' if gate.passed else 'FAILED'} at {level} level", gate.summary(), captions)
    atomic_write_text(out_dir / "report.html", page)
    return {"samples": "samples.png", "confusion": "confusion.png", "nearest": "nearest.png", "html": "report.html",
            "nearest_distances": dists}


def _track(params: Params, out_dir: Path, values: dict[str, float], gate: GateResult, release_passed: bool, extra: dict | None) -> str | None:
    """Log metrics, reports and pictures to an MLflow run (``eval.tracking``); returns its id."""
    if not params.eval.tracking:
        return None
    import math

    import mlflow

    from radsynth.tracking import provenance, setup_mlflow

    setup_mlflow(params)
    gen = (extra or {}).get("generator") or {}
    with mlflow.start_run(run_name=STEP, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({**provenance(params), "step": STEP, "gate": "passed" if gate.passed else "failed", "gate_level": gate.level,
                         "release_passed": str(release_passed).lower(), "generator_sha256": str(gen.get("sha256", ""))})
        mlflow.log_metrics({k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        for name in ("gate.md", "gate.json", "metrics.json", "calibration.md", "calibration.json", "samples.png", "confusion.png",
                     "nearest.png", "report.html", "params.yaml"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path=STEP)
        return run.info.run_id


def evaluate(params: Params, generator_path: str | Path | None = None, dataset_dir: str | Path | None = None,
             out_dir: str | Path | None = None, progress: bool = False, calibrate: bool | None = None) -> EvaluationResult:
    """Evaluate the trained ``G_ema``: sample it, compute every metric, apply the gate, write reports.

    Args:
        params: resolved config.
        generator_path: ``G_ema`` checkpoint (default ``<artifacts>/train/G_ema.safetensors``).
        dataset_dir: prepared dataset (default ``<artifacts>/dataset``).
        out_dir: reports (default ``<artifacts>/evaluate``).
        progress: progress bars and a summary table.
        calibrate: run the calibration sets too (default ``eval.calibrate``).

    Returns:
        :class:`EvaluationResult`; ``passed`` is the verdict at the profile's gate level.
    """
    from model.checkpoint import load_generator
    from radsynth.dataset import load_dataset
    from radsynth.io import sha256_file

    art = Path(params.paths.artifacts)
    generator_path = Path(generator_path or art / "train" / "G_ema.safetensors")
    dataset_dir = Path(dataset_dir or art / "dataset")
    out_dir = Path(out_dir or art / STEP)
    if not generator_path.is_file():
        raise RadsynthError(f"{generator_path}: no trained generator; run `radsynth train` first or pass --generator")
    G, meta = load_generator(generator_path)
    classes = list(meta.get("classes") or [])
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
                           extra=extra, progress=progress, calibrate=calibrate)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", default=None, help="G_ema checkpoint (default <artifacts>/train/G_ema.safetensors)")
    parser.add_argument("--dataset", default=None, help="prepared dataset (default <artifacts>/dataset)")
    parser.add_argument("--out", default=None, help="report folder (default <artifacts>/evaluate)")
    parser.add_argument("--allow-fail", action="store_true",
                        help="exit 0 when the gate fails: the verdict is recorded in gate.json (DVC runs it so)")
    parser.add_argument("--calibrate", action="store_true",
                        help="run the gate on the calibration sets (calibration.md); without a trained generator, only that")
    parser.add_argument("--calibration-only", action="store_true",
                        help="only the judge and the calibration sets, even when a trained generator exists")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    art = Path(params.paths.artifacts)
    generator = Path(args.generator or art / "train" / "G_ema.safetensors")
    if args.calibration_only or (args.calibrate and not generator.is_file()):
        cal = calibrate(params, args.dataset, args.out, progress=True)
        print(calibration_markdown(cal))
        print(f"calibration: {'every verdict as expected' if cal['ok'] else 'WRONG VERDICTS (see the table)'}; "
              f"report: {Path(args.out or art / STEP) / 'calibration.md'}")
        return 0 if cal["ok"] else 1
    result = evaluate(params, args.generator, args.dataset, args.out, progress=True, calibrate=True if args.calibrate else None)
    if result.calibration is not None and args.calibrate:
        print(calibration_markdown(result.calibration))
    print(result.gate.summary())
    if result.level != "release":
        print(f"release level: {'passed' if result.release_passed else 'not reached'} (gate.md lists the distances in reference units)")
    print(f"reports: {result.out_dir / 'gate.md'}, {result.out_dir / 'metrics.json'}, {result.out_dir / 'report.html'}")
    for key, why in sorted(result.unavailable.items()):
        print(f"unavailable: {key}: {why}")
    if not result.passed and params.eval.enforce and not args.allow_fail:
        return 1
    return 0
