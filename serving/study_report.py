"""A reader study's report: every figure from the answers, as JSON, Markdown and a model-card section.

Pure functions of a study and its answers (no files, no registry), so a model-card generator can
import them without MLflow or Triton:

- :func:`compute_report`: per reader and pooled, accuracy at telling real from synthetic with
  its interval and exact test against 50 %, synthetic called real, real called real, ROC AUC of
  the 10-step rating, condition agreement on real and on synthetic images, Fleiss' kappa among
  readers, per-condition figures and confusion tables (statistics: ``radsynth/study_stats.py``).
- :func:`format_markdown` (``report.md``), :func:`card_section` (``## Reader study`` for the
  model card) and :func:`with_card_section` (puts it into an existing card, idempotently),
  :func:`report_tags` (the MLflow model-version tags).
"""

from __future__ import annotations

import statistics
from typing import Sequence

from serving.study_store import CALLS, CANNOT_TELL, Answer, Study, now

TAG_PREFIX = "reader_study."
CARD_BEGIN = "<!-- radsynth:reader-study:begin -->"
CARD_END = "<!-- radsynth:reader-study:end -->"

# Keys of the report (report.json, MLflow tags, the Markdown): one name per figure.
ACCURACY = "accuracy"                          # share of items called correctly (real vs synthetic); 0.5 = chance
ACCURACY_P = "accuracy_p_value"                # exact two-sided binomial test of the accuracy against 0.5
SYNTHETIC_CALLED_REAL = "synthetic_called_real"  # share of synthetic items called real
REAL_CALLED_REAL = "real_called_real"          # share of real items called real (the readers' base rate)
AUC = "auc"                                    # ROC AUC of the 10-step rating for "synthetic"
AGREEMENT_REAL = "condition_agreement_real"    # answered condition = label, on real items
AGREEMENT_SYNTHETIC = "condition_agreement_synthetic"  # answered condition = requested condition, on synthetic items
CANNOT_TELL_SHARE = "condition_cannot_tell"    # share of "cannot tell" condition answers
KAPPA_CALL = "fleiss_kappa_call"               # inter-reader agreement on real vs synthetic
KAPPA_CONDITION = "fleiss_kappa_condition"     # inter-reader agreement on the condition


def _summary(answers: Sequence[Answer], items: dict, classes: Sequence[str], level: float, method: str) -> dict:
    """Every per-reader figure for one set of answers (one reader's, or all pooled)."""
    from radsynth import study_stats as st

    def share(hits: int, n: int) -> dict:
        return st.proportion(hits, n, level, method).to_dict()

    real = [a for a in answers if items[a.item]["kind"] == "real"]
    synthetic = [a for a in answers if items[a.item]["kind"] == "synthetic"]
    correct = sum(a.call == items[a.item]["kind"] for a in answers)
    scores = [st.rating_scale(a.call, a.confidence) for a in answers]
    positive = [items[a.item]["kind"] == "synthetic" for a in answers]
    auc = st.roc_auc(scores, positive)
    auc_ci = st.auc_interval(auc, len(synthetic), len(real), level)
    times = [a.elapsed_ms / 1000.0 for a in answers if a.elapsed_ms is not None]
    return {
        "answers": len(answers),
        ACCURACY: share(correct, len(answers)),
        ACCURACY_P: st.binomial_test(correct, len(answers), 0.5),
        SYNTHETIC_CALLED_REAL: share(sum(a.call == "real" for a in synthetic), len(synthetic)),
        REAL_CALLED_REAL: share(sum(a.call == "real" for a in real), len(real)),
        AUC: {"value": auc, "low": auc_ci[0] if auc_ci else None, "high": auc_ci[1] if auc_ci else None,
              "level": level, "method": "hanley-mcneil"},
        AGREEMENT_REAL: share(sum(a.condition == items[a.item]["condition"] for a in real), len(real)),
        AGREEMENT_SYNTHETIC: share(sum(a.condition == items[a.item]["condition"] for a in synthetic), len(synthetic)),
        CANNOT_TELL_SHARE: share(sum(a.condition == CANNOT_TELL for a in answers), len(answers)),
        "median_seconds": statistics.median(times) if times else None,
    }


def _confusion(answers: Sequence[Answer], items: dict, classes: Sequence[str], kind: str) -> dict:
    columns = list(classes) + [CANNOT_TELL]
    table = {c: {col: 0 for col in columns} for c in classes}
    for a in answers:
        item = items[a.item]
        if item["kind"] == kind and a.condition in columns:
            table[item["condition"]][a.condition] += 1
    return table


def compute_report(study: Study, answers: Sequence[Answer], level: float = 0.95, method: str = "wilson") -> dict:
    """Every figure of the study from its answers (pure: no files, no MLflow).

    Returns:
        The report dict written as ``report.json``: ``readers`` (one summary each), ``pooled``,
        ``inter_reader`` (Fleiss' kappa over the items every reader answered), ``per_condition``,
        ``confusion`` (pooled condition answers on real and on synthetic items), ``interpretation``.
    """
    from radsynth import study_stats as st

    items = {item["item"]: item for item in study.manifest["items"]}
    classes = list(study.classes)
    per_reader = []
    for reader in range(1, study.num_readers + 1):
        mine = [a for a in answers if a.reader == reader]
        per_reader.append({"reader": reader, "complete": len(mine) == study.num_images,
                           **_summary(mine, items, classes, level, method)})
    pooled = _summary(list(answers), items, classes, level, method)

    by_item: dict[int, list[Answer]] = {}
    for a in answers:
        by_item.setdefault(a.item, []).append(a)
    full = [group for group in by_item.values() if len({a.reader for a in group}) == study.num_readers]
    kappa_call = kappa_condition = None
    if study.num_readers >= 2 and full:
        kappa_call = st.fleiss_kappa([[sum(a.call == c for a in group) for c in CALLS] for group in full])
        categories = classes + [CANNOT_TELL]
        kappa_condition = st.fleiss_kappa([[sum(a.condition == c for a in group) for c in categories] for group in full])
    per_condition = {}
    for name in classes:
        subset = [a for a in answers if items[a.item]["condition"] == name]
        summary = _summary(subset, items, classes, level, method)
        per_condition[name] = {k: summary[k] for k in ("answers", SYNTHETIC_CALLED_REAL, AGREEMENT_REAL, AGREEMENT_SYNTHETIC)}
    expected = study.num_readers * study.num_images
    report = {
        "study": study.id,
        "title": study.title,
        "model": {"name": study.model_name, "version": study.model_version,
                  "alias_at_creation": study.manifest["model"].get("alias"),
                  "onnx_sha256": study.manifest["model"].get("onnx_sha256", "")},
        "created": study.manifest.get("created"),
        "reported": now(),
        "design": {**study.manifest["design"], "classes": classes, "ci_level": level, "ci_method": method},
        "completeness": {"answers": len(answers), "expected": expected,
                         "complete_readers": sum(r["complete"] for r in per_reader), "closed": study.closed},
        "readers": per_reader,
        "pooled": pooled,
        "inter_reader": {
            KAPPA_CALL: kappa_call, KAPPA_CONDITION: kappa_condition,
            "items": len(full), "readers": study.num_readers,
        },
        "per_condition": per_condition,
        "confusion": {"real": _confusion(answers, items, classes, "real"),
                      "synthetic": _confusion(answers, items, classes, "synthetic")},
    }
    report["interpretation"] = interpret(report)
    return report


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f} %"


def _interval(entry: dict) -> str:
    if entry.get("value") is None:
        return "n/a"
    return f"{_pct(entry['value'])} [{_pct(entry['low'])}, {_pct(entry['high'])}]"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _kappa_words(kappa: float | None) -> str:
    if kappa is None:
        return "undefined"
    bands = ((0.0, "poor: below chance"), (0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial"))
    for upper, words in bands:
        if kappa < upper:
            return words
    return "almost perfect"


def interpret(report: dict) -> list[str]:
    """Plain sentences about the pooled figures (what a reader of the report should take away)."""
    pooled = report["pooled"]
    acc = pooled[ACCURACY]
    level = _pct(report["design"]["ci_level"], 0)
    out = []
    done = report["completeness"]
    if done["answers"] < done["expected"]:
        out.append(f"Incomplete: {done['answers']} of {done['expected']} answers so far; every figure may still change.")
    if acc["value"] is None:
        return out + ["No answers yet."]
    if acc["low"] > 0.5:
        out.append(f"Readers told real from synthetic better than chance: accuracy {_interval(acc)} ({level} interval above 50 %).")
    elif acc["high"] < 0.5:
        out.append(f"Readers did worse than chance (accuracy {_interval(acc)}): they systematically took synthetic images "
                   "for real and real ones for synthetic.")
    else:
        out.append(f"Readers could not tell synthetic from real better than chance at this sample size: accuracy "
                   f"{_interval(acc)}; the {level} interval includes 50 %. This is not proof that the images are "
                   "indistinguishable: a larger study narrows the interval.")
    out.append(f"{_pct(pooled[SYNTHETIC_CALLED_REAL]['value'])} of synthetic images were called real "
               f"(real images: {_pct(pooled[REAL_CALLED_REAL]['value'])}).")
    auc = pooled[AUC]["value"]
    if auc is not None:
        out.append(f"ROC AUC of the confidence ratings {_num(auc)} (0.5: ratings carry no information about which is which; 1: perfect).")
    out.append(f"The answered condition matched the label on {_pct(pooled[AGREEMENT_REAL]['value'])} of real images and the "
               f"requested condition on {_pct(pooled[AGREEMENT_SYNTHETIC]['value'])} of synthetic images.")
    kappa = report["inter_reader"][KAPPA_CALL]
    if kappa is not None:
        out.append(f"Readers agreed with each other on real vs synthetic with Fleiss' kappa {_num(kappa)} "
                   f"({_kappa_words(kappa)}, Landis-Koch), over {report['inter_reader']['items']} images answered by all.")
    return out


def format_markdown(report: dict) -> str:
    """The whole report as Markdown (``report.md``)."""
    model = report["model"]
    design = report["design"]
    level = _pct(design["ci_level"], 0)
    lines = [
        f"# Reader study {report['study']}",
        "",
        *([report["title"], ""] if report.get("title") else []),
        f"Model **{model['name']} version {model['version']}**"
        + (f" (reached as @{model['alias_at_creation']} when the study was made)" if model.get("alias_at_creation") else "")
        + f"; ONNX sha256 `{model['onnx_sha256'][:16]}...`.",
        f"Created {report['created']}, reported {report['reported']}. {design['images']} images "
        f"({design['real']} real from the test split, {design['synthetic']} synthetic, balanced over "
        f"{', '.join(design['classes'])}), {design['readers']} readers. Intervals: {level}, "
        f"{'Wilson score' if design['ci_method'] == 'wilson' else 'exact Clopper-Pearson'} for shares, Hanley-McNeil for the AUC.",
        "",
        "## Findings",
        "",
        *[f"- {sentence}" for sentence in report["interpretation"]],
        "",
        "## Per reader and pooled",
        "",
        f"| Reader | Answers | Accuracy ({level} CI) | p vs 50 % | Synthetic called real | Real called real | ROC AUC | "
        "Condition agreement, real | Condition agreement, synthetic | Median s/image |",
        "|---|---:|---|---:|---|---|---|---|---|---:|",
    ]
    rows = [(f"{r['reader']}" + ("" if r["complete"] else " (incomplete)"), r) for r in report["readers"]]
    rows.append(("**pooled**", report["pooled"]))
    for name, r in rows:
        auc = r[AUC]
        auc_text = _num(auc["value"]) + ("" if auc["low"] is None else f" [{auc['low']:.3f}, {auc['high']:.3f}]")
        lines.append(f"| {name} | {r['answers']} | {_interval(r[ACCURACY])} | {_p(r[ACCURACY_P])} | "
                     f"{_interval(r[SYNTHETIC_CALLED_REAL])} | {_interval(r[REAL_CALLED_REAL])} | {auc_text} | "
                     f"{_interval(r[AGREEMENT_REAL])} | {_interval(r[AGREEMENT_SYNTHETIC])} | "
                     f"{_num(r['median_seconds'], 1)} |")
    inter = report["inter_reader"]
    lines += [
        "",
        "Pooled figures treat every answer as independent; the same images were read by every reader, "
        "so the pooled intervals are narrower than a reader-and-case-aware analysis (e.g. Obuchowski-Rockette) would give.",
        "",
        "## Agreement between readers",
        "",
        f"Fleiss' kappa over the {inter['items']} images answered by all {inter['readers']} readers: "
        f"real vs synthetic **{_num(inter[KAPPA_CALL])}** ({_kappa_words(inter[KAPPA_CALL])}), "
        f"condition **{_num(inter[KAPPA_CONDITION])}** ({_kappa_words(inter[KAPPA_CONDITION])}).",
        "",
        "## Per condition (pooled)",
        "",
        "| Condition | Answers | Synthetic called real | Condition agreement, real | Condition agreement, synthetic |",
        "|---|---:|---|---|---|",
    ]
    for name, c in report["per_condition"].items():
        lines.append(f"| {name} | {c['answers']} | {_interval(c[SYNTHETIC_CALLED_REAL])} | "
                     f"{_interval(c[AGREEMENT_REAL])} | {_interval(c[AGREEMENT_SYNTHETIC])} |")
    for kind in ("real", "synthetic"):
        table = report["confusion"][kind]
        columns = list(design["classes"]) + [CANNOT_TELL]
        lines += ["", f"Condition answers on {kind} images (rows: {'label' if kind == 'real' else 'requested condition'}):", "",
                  "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for name, row in table.items():
            lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
    lines += ["", "## What this is", "",
              "A research instrument: a visual Turing test of one model version by these readers, "
              "not a clinical validation. It says whether these readers could tell these synthetic images from "
              "real ones of this dataset, nothing about diagnostic use. Synthetic images carry no diagnostic meaning.", ""]
    return "\n".join(line for line in lines if line is not None) + ("" if lines[-1] == "" else "\n")


def card_section(report: dict) -> str:
    """The study as a Markdown section for the model card (``## Reader study``).

    Use it from the model-card generator, or through :func:`with_card_section` to put it into an
    existing card (the MLflow version description) idempotently.
    """
    pooled = report["pooled"]
    design = report["design"]
    done = report["completeness"]
    level = _pct(design["ci_level"], 0)
    auc = pooled[AUC]
    lines = [
        "## Reader study",
        "",
        f"Visual Turing test `{report['study']}` of version {report['model']['version']} "
        f"({report['reported'][:10]}): {design['readers']} readers, {design['images']} images "
        f"({design['real']} real from the test split, {design['synthetic']} synthetic, balanced over conditions); "
        f"{done['answers']} of {done['expected']} answers.",
        "",
        "| Figure (pooled) | Value |",
        "|---|---|",
        f"| Accuracy real vs synthetic ({level} CI; 50 % = indistinguishable) | {_interval(pooled[ACCURACY])} |",
        f"| Synthetic images called real | {_interval(pooled[SYNTHETIC_CALLED_REAL])} |",
        f"| Real images called real | {_interval(pooled[REAL_CALLED_REAL])} |",
        f"| ROC AUC of the confidence ratings | {_num(auc['value'])} |",
        f"| Condition agreement on real / synthetic images | {_pct(pooled[AGREEMENT_REAL]['value'])} / "
        f"{_pct(pooled[AGREEMENT_SYNTHETIC]['value'])} |",
        f"| Fleiss' kappa, real vs synthetic | {_num(report['inter_reader'][KAPPA_CALL])} |",
        "",
        *[f"- {sentence}" for sentence in report["interpretation"]],
        "",
        "A research instrument, not a clinical validation.",
    ]
    return "\n".join(lines) + "\n"


def with_card_section(description: str | None, section: str) -> str:
    """``description`` with the reader-study section replaced (or appended), between markers."""
    block = f"{CARD_BEGIN}\n{section.rstrip()}\n{CARD_END}"
    text = description or ""
    start, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(CARD_END):]
    return (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"


def report_tags(report: dict) -> dict[str, str]:
    """The MLflow model-version tags of a report (``reader_study.*``, strings)."""
    pooled = report["pooled"]

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    def ci(entry: dict) -> str:
        return "" if entry.get("low") is None else f"[{entry['low']:.4f}, {entry['high']:.4f}]"

    done = report["completeness"]
    return {
        TAG_PREFIX + "id": report["study"],
        TAG_PREFIX + ACCURACY: fmt(pooled[ACCURACY]["value"]),
        TAG_PREFIX + ACCURACY + "_ci": ci(pooled[ACCURACY]),
        TAG_PREFIX + SYNTHETIC_CALLED_REAL: fmt(pooled[SYNTHETIC_CALLED_REAL]["value"]),
        TAG_PREFIX + SYNTHETIC_CALLED_REAL + "_ci": ci(pooled[SYNTHETIC_CALLED_REAL]),
        TAG_PREFIX + AUC: fmt(pooled[AUC]["value"]),
        TAG_PREFIX + AGREEMENT_REAL: fmt(pooled[AGREEMENT_REAL]["value"]),
        TAG_PREFIX + AGREEMENT_SYNTHETIC: fmt(pooled[AGREEMENT_SYNTHETIC]["value"]),
        TAG_PREFIX + KAPPA_CALL: fmt(report["inter_reader"][KAPPA_CALL]),
        TAG_PREFIX + "readers": str(report["design"]["readers"]),
        TAG_PREFIX + "images": str(report["design"]["images"]),
        TAG_PREFIX + "answers": f"{done['answers']}/{done['expected']}",
        TAG_PREFIX + "reported": report["reported"],
    }
