"""The model card of a registered generator version: Markdown, generated from the run's own files.

``radsynth register`` writes it beside ``register.json``, logs it (and its sample grid) as
artefacts of the registration run, and sets it as the MLflow model version's description, so
the MLflow UI shows it on the version page. Everything in it is read from what the pipeline
wrote, never typed in:

* data: the pinned export (``data_md5``), the dataset identity and the images per condition
  and split (``<artifacts>/dataset``);
* training: the variant and schedule from the resolved params, kimg and time from ``train.json``;
* the evaluation gate: level (``release`` | ``demo`` | ``unknown``), verdict and every check
  (``gate.json``), the headline metrics (``metrics.json``), calibration (``calibration.json``,
  when the evaluation wrote one);
* a per-condition sample grid made from the registered ONNX file itself (the same latents
  in every row, so rows differ only by condition);
* intended use, limits, and "research use only".

A demo-level gate is never presented as a release: the card says which level the thresholds
were and whether the release thresholds were met.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from radsynth import metric_keys as mk
from radsynth.config import Params

CARD_FILE = "model_card.md"
GRID_FILE = "model_card_grid.png"
# MLflow's SQL stores hold a model version description in VARCHAR(5000).
DESCRIPTION_LIMIT = 5000
HEADLINE_METRICS = (mk.FID_DOMAIN, mk.COND_ACC, mk.REAL_ACC, mk.PRECISION, mk.RECALL, mk.MS_SSIM_DIVERSITY, mk.FID_INCEPTION)
RESEARCH_ONLY = ("**Research use only.** The images are synthetic: they show no real patient, carry no diagnostic "
                 "meaning and must not be used for diagnosis, treatment or any clinical decision.")


@dataclasses.dataclass(frozen=True)
class GateLevel:
    """What the gate says about a version, as registry tags and people read it."""

    level: str                                 # release | demo | unknown (the thresholds the verdict is at)
    verdict: str                               # passed | failed
    release_passed: str                        # true | false | unknown (the release thresholds, whatever the level)

    @property
    def is_release(self) -> bool:
        """Passed at the release level: the only case labelled a release."""
        return self.level == "release" and self.verdict == "passed" and self.release_passed != "false"

    def label(self) -> str:
        """One line, e.g. ``passed at demo level (not a release)``."""
        if self.level == "unknown":
            return f"{self.verdict} (gate level not recorded: not a release)"
        if self.is_release:
            return "passed at release level"
        suffix = "" if self.level == "release" else " (not a release)"
        return f"{self.verdict} at {self.level} level{suffix}"


def gate_level(gate: Mapping[str, Any]) -> GateLevel:
    """Read ``gate.json``: ``passed`` plus ``level`` and ``release_passed`` where the evaluation records them."""
    level = str(gate.get("level") or "unknown")
    if level not in ("release", "demo"):
        level = "unknown"
    release = gate.get("release_passed")
    return GateLevel(level=level, verdict="passed" if gate.get("passed") else "failed",
                     release_passed="unknown" if release is None else ("true" if release else "false"))


def counts_per_condition(dataset_dir: str | Path) -> dict[str, dict[str, int]]:
    """Images per condition and split of a prepared dataset: ``{condition: {train, val, test}}``."""
    from radsynth.dataset import load_dataset

    ds = load_dataset(dataset_dir)
    return {c: {s: int(((ds.labels == i) & (ds.splits == s)).sum()) for s in ("train", "val", "test")}
            for i, c in enumerate(ds.classes)}


def sample_grid(onnx_path: str | Path, classes: Sequence[str], per_class: int, seed: int, out_path: str | Path,
                row_labels: Sequence[str] = ()) -> Path:
    """A PNG grid from an exported generator: one row per condition, the same ``per_class`` latents in each.

    Args:
        onnx_path: the generator ONNX (inputs ``z`` [N, z_dim], ``class`` [N]; output ``image``).
        classes: condition codes in the model's class order.
        per_class: images per row.
        seed: :func:`radsynth.latent.z_from_seed` seed.
        out_path: the PNG written (atomic).
        row_labels: text on the left of each row (e.g. display names).
    """
    import onnxruntime as ort

    from radsynth.dataset import to_uint8
    from radsynth.grid import save_grid_png
    from radsynth.latent import z_from_seed

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    z_dim = int(session.get_inputs()[0].shape[1])
    z = z_from_seed(seed, per_class, z_dim)                                          # [P, z_dim]
    rows = []
    for k in range(len(classes)):
        images = session.run(["image"], {"z": z, "class": np.full(per_class, k, dtype=np.int64)})[0]  # [P, C, R, R]
        rows.append(np.concatenate(list(to_uint8(images).transpose(0, 2, 3, 1)), axis=1))           # [R, P*R, C]
    return save_grid_png(out_path, np.concatenate(rows, axis=0), list(row_labels))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def _calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    if not calibration:
        return ["No calibration report was written by this evaluation (`calibration.json` absent)."]
    lines = []
    if isinstance(calibration.get("summary"), str):
        lines += [calibration["summary"], ""]
    scalars = [(k, v) for k, v in calibration.items() if k != "summary" and isinstance(v, (int, float, str, bool))]
    if scalars:
        lines += _table(("quantity", "value"), scalars[:16])
    nested = [k for k, v in calibration.items() if isinstance(v, (dict, list))]
    if nested:
        lines += ["", "Further detail in `calibration.json`: " + ", ".join(f"`{k}`" for k in nested[:8]) + "."]
    return lines or ["`calibration.json` holds no summary values."]


def render(
    params: Params,
    *,
    name: str,
    version: int | str,
    lineage: Mapping[str, str],
    export_record: Mapping[str, Any],
    gate: Mapping[str, Any],
    metrics: Mapping[str, Any],
    classes: Sequence[str],
    counts: Mapping[str, Mapping[str, int]] | None = None,
    train_summary: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    grid_file: str | None = GRID_FILE,
    compact: bool = False,
) -> str:
    """The model card as Markdown.

    Args:
        params: the resolved config (training recipe, display names, card grid settings).
        name, version: the registered model and version.
        lineage: ``train_run_id``, ``git_commit``, ``data_md5``, ``params_digest``, ``data_identity``.
        export_record: ``export.json``.
        gate: ``gate.json``.
        metrics: ``metrics.json``.
        classes: condition codes, model class order.
        counts: :func:`counts_per_condition` (None: the dataset was not available).
        train_summary: ``train.json`` (None: not available).
        calibration: ``calibration.json`` (None: not written).
        grid_file: the grid PNG's name beside the card (None: no grid).
        compact: the failed checks only instead of every check (keeps a description short).

    Returns:
        The Markdown text.
    """
    g = gate_level(gate)
    meta = export_record.get("metadata", {})
    res = meta.get("img_resolution", "?")
    show = params.display_name
    lines = [f"# Model card: {name} v{version}", "", f"> {RESEARCH_ONLY}", "",
             f"A class-conditional image generator (`{meta.get('variant', params.model.variant)}`) of "
             f"{res}x{res} synthetic chest radiographs for {len(classes)} conditions: "
             + ", ".join(f"{show(c)} (`{c}`)" for c in classes) + ".", ""]
    lines += _table(("", ""), [
        ("Evaluation gate", g.label()),
        ("Training run (MLflow)", f"`{lineage.get('train_run_id', 'unknown')}`"),
        ("Code (git commit)", f"`{lineage.get('git_commit', 'unknown')}`"),
        ("Data version (md5 of the export)", f"`{lineage.get('data_md5', 'unknown')}`"),
        ("Params digest", f"`{str(lineage.get('params_digest', 'unknown'))[:16]}`, profile `{params.profile}`"),
        ("ONNX sha256", f"`{str(export_record.get('sha256', ''))[:16]}`, opset {export_record.get('opset', '?')}"),
    ])

    lines += ["", "## Data", ""]
    if counts:
        rows = [(show(c), f"`{c}`", n["train"], n["val"], n["test"], sum(n.values())) for c, n in counts.items()]
        rows.append(("all", "", *(sum(n[s] for n in counts.values()) for s in ("train", "val", "test")),
                     sum(sum(n.values()) for n in counts.values())))
        lines += _table(("condition", "code", "train", "val", "test", "images"), rows)
        lines += ["", "Split by patient (no patient in two splits). "
                  + (f"Dataset identity `{lineage['data_identity'][:16]}`." if lineage.get("data_identity") else "")]
    else:
        lines += ["The prepared dataset was not available to this registration, so counts per condition are not shown."]

    t, m = params.train, params.model
    lines += ["", "## Training recipe", ""]
    penalty = f"lambda {t.gp_lambda:g}" + (f", lazy: every {t.gp_interval} critic steps" if t.gp_interval > 1 else "")
    augment = (f"{', '.join(t.augment)} (p {t.augment_p:g}" + (f", adaptive to {t.augment_target:g}" if t.augment_target else "") + ")"
               if t.augment else "none")
    recipe = [("recipe", t.recipe or "(params.yaml defaults)"), ("variant", m.variant), ("latent size z_dim", m.z_dim),
              ("loss", f"WGAN-GP ({penalty}, drift {t.drift_epsilon:g})"),
              ("optimiser", f"Adam lr_G {t.lr_g:g}, lr_D {t.lr_d:g}, betas ({t.beta1:g}, {t.beta2:g}), {t.n_critic} critic steps per G step"),
              ("G_ema", f"half-life {t.ema_kimg:g} kimg" if t.ema_kimg > 0 else "off (G_ema = G)"),
              ("critic-input augmentation", augment), ("class-balanced sampling", t.balanced_classes),
              ("schedule", f"{t.start_resolution} -> {t.final_resolution or params.data.img_resolution} px, "
                           f"{t.kimg_fade:g} kimg fade + {t.kimg_stabilize:g} kimg stabilise per stage")]
    trained = [text for key, text in (("kimg", "{} kimg"), ("seconds", "in {} s"), ("device", "on {}"))
               if (train_summary or {}).get(key) is not None for text in [text.format(_fmt(train_summary[key]))]]
    if trained:
        recipe += [("trained", " ".join(trained))]
    lines += _table(("", ""), recipe)

    lines += ["", "## Evaluation gate", "", f"Verdict: **{g.label()}**"
              + ("" if g.release_passed == "unknown" else f"; release thresholds met: {g.release_passed}") + ".", ""]
    checks = gate.get("checks", [])
    shown = [c for c in checks if not c.get("passed")] if compact else checks
    if shown:
        lines += _table(("check", "value", "rule", "result"),
                        [(c["name"], c.get("value") if c.get("value") is not None else "n/a",
                          f"{c['op']} {_fmt(c['threshold'])}", "pass" if c.get("passed") else "**FAIL**") for c in shown])
    if compact:
        lines += ["", f"{len(checks) - len(shown)} of {len(checks)} checks passed; every check is in the card artefact."]
    rows = []
    for key in HEADLINE_METRICS:
        if key not in metrics:
            continue
        ref = metrics.get(key + mk.REF_SUFFIX)
        rows.append((key, metrics[key], "" if ref is None else ref,
                     *(metrics.get(mk.per_class(key, c), "") for c in classes)))
    if rows:
        lines += ["", "Headline metrics (generated; real-vs-real reference where one exists):", ""]
        lines += _table(("metric", "all", "reference", *(show(c) for c in classes)), rows)

    lines += ["", "## Calibration", ""] + _calibration_lines(calibration)

    if grid_file:
        r = params.registry
        lines += ["", "## Samples", "", f"![One row per condition, the same {r.card_grid_per_class} latents in every row]({grid_file})", "",
                  f"Rows (top to bottom): {', '.join(show(c) for c in classes)}; latent seed {r.card_grid_seed}, "
                  f"drawn from this exact ONNX file."]

    lines += ["", "## Intended use", "",
              "- Research and development of medical-imaging AI: augmenting or sharing training data without patient images, "
              "testing pipelines, teaching.",
              "- Synthetic data for downstream training must be validated on real data before any claim is made.",
              "", "## Limits", "",
              f"- Trained on {_trained_on(counts)} from one export; it reproduces that population's scanners, ages and "
              "label noise, and no other.",
              f"- {res}x{res} pixels: far below diagnostic resolution; fine findings are not represented.",
              "- The condition is what the labels said; a generated image is not evidence of a finding.",
              "- The memorisation check bounds, but does not exclude, near-copies of training images.",
              "", "## Research use only", "", RESEARCH_ONLY, ""]
    return "\n".join(lines)


def _trained_on(counts: Mapping[str, Mapping[str, int]] | None) -> str:
    if not counts:
        return "images"
    train = sum(n["train"] for n in counts.values())
    return f"{train} images (the train split of {sum(sum(n.values()) for n in counts.values())})"


def description(card: str, compact_card: str, artefact_uri: str) -> str:
    """The model version description: the card, or its compact form when too long for the registry."""
    for text in (card, compact_card):
        if len(text) <= DESCRIPTION_LIMIT:
            return text
    note = f"\n\n(Shortened for the registry; the whole card: `{artefact_uri}`.)\n"
    return compact_card[:DESCRIPTION_LIMIT - len(note)] + note


def read_optional_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is absent."""
    return json.loads(path.read_text()) if path.is_file() else None
