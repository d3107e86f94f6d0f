"""``radsynth study``: the radiologists' visual Turing test, tied to one model version.

    radsynth study create --readers 3 --images 40 [--alias champion | --version 3] [--seed S]
    radsynth study list
    radsynth study report [--study ID] [--no-mlflow]
    radsynth study close --study ID
    radsynth study reissue --study ID --reader 2

``create`` resolves the alias to a version once (``models:/<name>@<alias>`` -> ``vN``) and
keeps that version for good: the synthetic half comes from Triton serving exactly ``vN``
(seeded, balanced over conditions), the real half from the prepared dataset's **test split**
(pixels only), the same number of each condition. Items are shuffled with a recorded seed and
every reader sees them in an own recorded order. Reader tokens are printed once; only their
sha256 is stored (``serving/study_store.py`` has the layout). The web app's ``/study/<token>``
page (``serving/web/study.py``) collects the answers.

``report`` computes per reader and pooled (:func:`compute_report`; the statistics are in
``radsynth/study_stats.py``) and writes ``report.md`` + ``report.json`` beside the study. It
tags model version ``vN`` (by number, never by alias, after checking its ``onnx_sha256``),
logs both files to that version's run and puts :func:`card_section` into its description
(the model card), so a study on an older version never attaches to a newer one.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import secrets
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from radsynth.config import Params
from serving.study_store import (
    CALLS, CANNOT_TELL, FORMAT_VERSION, Answer, AnswerStore, Study, StudyError, find_study, hash_token, list_studies,
    load_study, new_token, now, studies_root, write_readers,
)

MAX_READERS = 200
MAX_IMAGES = 2000
TAG_PREFIX = "reader_study."
CARD_BEGIN = "<!-- radsynth:reader-study:begin -->"
CARD_END = "<!-- radsynth:reader-study:end -->"
ARTIFACT_DIR = "reader_study"

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


# --------------------------------------------------------------------------------------
# The model a study is about
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One registered generator version, resolved once."""

    name: str
    version: int
    alias: str | None                          # the alias it was reached by at creation (None: by number)
    onnx_sha256: str
    gate: str                                  # passed | failed | "" (the version's gate tag)
    run_id: str
    classes: tuple[str, ...]
    z_dim: int
    img_resolution: int
    img_channels: int


class ImageSource(Protocol):
    """Where synthetic images come from: ``generate(z [N, z_dim], class [N]) -> float32 [N, C, H, W]``."""

    max_batch: int

    def generate(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray: ...


def _mlflow_client(params: Params):
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow import MlflowClient

    from radsynth.tracking import setup_mlflow

    setup_mlflow(params)
    return MlflowClient()


def resolve_model(params: Params, alias: str | None = None, version: int | None = None,
                  model_name: str | None = None) -> ModelRef:
    """Resolve ``models:/<name>@<alias>`` (default ``registry.champion_alias``) or ``<name>/<version>``.

    Raises:
        StudyError: no such alias or version, or the version lacks the tags a study needs.
    """
    from mlflow.exceptions import MlflowException

    name = model_name or params.registry.model_name
    client = _mlflow_client(params)
    try:
        if version is None:
            alias = alias or params.registry.champion_alias
            mv = client.get_model_version_by_alias(name, alias)
        else:
            alias = None
            mv = client.get_model_version(name, str(version))
    except MlflowException:
        what = f"models:/{name}@{alias}" if version is None else f"models:/{name}/{version}"
        raise StudyError(f"{what} does not exist in the registry ({params.paths.mlflow_uri}); "
                         "register and promote a model, or pass --alias / --version") from None
    tags = dict(mv.tags or {})
    missing = [k for k in ("classes", "z_dim", "img_resolution", "img_channels", "onnx_sha256") if not tags.get(k)]
    if missing:
        raise StudyError(f"models:/{name}/{mv.version} lacks the registry tags {missing}; register it with `radsynth register`")
    try:
        classes = tuple(json.loads(tags["classes"]))
    except ValueError:
        raise StudyError(f"models:/{name}/{mv.version}: tag 'classes' is not a JSON list") from None
    return ModelRef(name=name, version=int(mv.version), alias=alias, onnx_sha256=tags["onnx_sha256"],
                    gate=tags.get("gate", ""), run_id=mv.run_id or "", classes=classes, z_dim=int(tags["z_dim"]),
                    img_resolution=int(tags["img_resolution"]), img_channels=int(tags["img_channels"]))


class TritonSource:
    """Synthetic images from Triton serving exactly ``model.version`` (never "the newest").

    Args:
        params: resolved config (``serve`` gives the address, timeouts and call size).
        model: the resolved version.
        url: Triton ``host:port`` (default ``serve.url`` / ``serve.host`` + port).

    Raises:
        StudyError: that version is not served, or the served model disagrees with the registry.
    """

    def __init__(self, params: Params, model: ModelRef, url: str | None = None):
        from serving.client import Client, ClientError

        self.client = Client.from_config(params.serve, url=url)
        self.client.model_name = model.name
        self.client.model_version = str(model.version)
        try:
            info = self.client.info
        except ClientError as exc:
            self.client.close()
            raise StudyError(f"{exc}. The study needs Triton to serve {model.name} version {model.version} "
                             "(`radsynth serve` serves the aliases in serve.aliases)") from None
        served = (tuple(info.classes), info.z_dim, info.img_resolution, info.img_channels)
        wanted = (model.classes, model.z_dim, model.img_resolution, model.img_channels)
        if served != wanted:
            self.client.close()
            raise StudyError(f"Triton's {model.name} v{model.version} has (classes, z_dim, resolution, channels) {served} "
                             f"but the registry says {wanted}; rebuild the model repository with `radsynth serve`")
        self.sha256_checked = False
        if info.parameters.get("registry_version") == str(model.version) and info.parameters.get("onnx_sha256"):
            if info.parameters["onnx_sha256"] != model.onnx_sha256:
                self.client.close()
                raise StudyError(f"Triton serves a different file as {model.name} v{model.version} "
                                 f"(sha256 {info.parameters['onnx_sha256'][:12]}... vs the registry's {model.onnx_sha256[:12]}...)")
            self.sha256_checked = True
        self.url = self.client.url
        self.max_batch = min(self.client.max_images_per_call, info.max_batch_size or self.client.max_images_per_call)

    def generate(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.client.infer(z, labels)

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------------------
# Creating a study
# --------------------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[C, H, W]`` -> an uncompressed 8-bit PNG without metadata.

    Stored (level-0) deflate makes the file size a function of the image size only, so a
    reader who looks at the download size learns nothing about the image.
    """
    from PIL import Image

    if image.shape[0] == 1:
        pil = Image.fromarray(np.ascontiguousarray(image[0]), mode="L")
    elif image.shape[0] == 3:
        pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")
    else:
        raise StudyError(f"images with {image.shape[0]} channels cannot be shown in a study")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def balanced_counts(total: int, conditions: Sequence[str], rng: np.random.Generator) -> dict[str, int]:
    """``total`` split over ``conditions`` as evenly as possible; the remainder goes to randomly
    chosen conditions (one extra each)."""
    base, extra = divmod(total, len(conditions))
    lucky = set(rng.choice(len(conditions), size=extra, replace=False).tolist()) if extra else set()
    return {c: base + (1 if i in lucky else 0) for i, c in enumerate(conditions)}


def _seeds(study_seed: int, num_conditions: int) -> dict:
    """Every seed of a study, drawn from the study seed in a fixed order."""
    rng = np.random.default_rng(study_seed)
    real, order, balance = (int(s) for s in rng.integers(0, 2**62, size=3))
    synthetic = [int(s) for s in rng.integers(0, 2**62, size=num_conditions)]
    return {"study": int(study_seed), "balance": balance, "real": real, "order": order, "synthetic": synthetic}


def check_design(readers: int, images: int, num_conditions: int) -> None:
    """Refuse a study that cannot be balanced (raises :class:`StudyError` naming the option)."""
    if not 1 <= readers <= MAX_READERS:
        raise StudyError(f"--readers must be between 1 and {MAX_READERS}, got {readers}")
    if images < 2 or images % 2 or images > MAX_IMAGES:
        raise StudyError(f"--images must be an even number between 2 and {MAX_IMAGES} (half real, half synthetic), got {images}")
    if images // 2 < num_conditions:
        raise StudyError(f"--images {images} gives {images // 2} synthetic images for {num_conditions} conditions; "
                         f"use at least {2 * num_conditions} so that every condition appears")


def create_study(params: Params, model: ModelRef, source: ImageSource, readers: int, images: int,
                 seed: int | None = None, title: str = "", dataset_dir: str | Path | None = None,
                 extra: dict | None = None) -> tuple[Study, list[str]]:
    """Build a study folder (atomically) and return it with one fresh token per reader.

    Args:
        params: resolved config (``study``, ``paths.artifacts``).
        model: the version the study is about (see :func:`resolve_model`).
        source: the served generator of exactly that version.
        readers: number of readers (one token each).
        images: number of items, even: half real (test split), half synthetic.
        seed: study seed (default ``study.seed``; negative: a fresh random one). Recorded.
        title: shown to readers on the first page.
        dataset_dir: the prepared dataset (default ``<paths.artifacts>/dataset``).
        extra: merged into the manifest's ``source`` record (e.g. the Triton address).

    Returns:
        ``(study, tokens)``; ``tokens[r - 1]`` is reader ``r``'s, shown to nobody else and stored only hashed.

    Raises:
        StudyError: bad sizes, a dataset that does not match the model, or too few test images.
    """
    from radsynth.dataset import load_dataset, to_uint8
    from radsynth.io import atomic_dir, sha256_file, write_json
    from radsynth.latent import z_from_seed
    from radsynth.tracking import provenance

    check_design(readers, images, len(model.classes))
    classes = list(model.classes)
    half = images // 2
    dataset_dir = Path(dataset_dir or Path(params.paths.artifacts) / "dataset")
    dataset = load_dataset(dataset_dir)
    if sorted(dataset.classes) != sorted(classes):
        raise StudyError(f"the dataset at {dataset_dir} has conditions {dataset.classes} but {model.name} "
                         f"v{model.version} generates {classes}; use the dataset the model was trained on")
    res = model.img_resolution
    if res not in dataset.levels or dataset.img_channels != model.img_channels:
        raise StudyError(f"{model.name} v{model.version} makes {model.img_channels}x{res}x{res} images; the dataset at "
                         f"{dataset_dir} has {dataset.img_channels} channel(s) at {dataset.levels}")

    if seed is None:
        seed = params.study.seed
    if seed < 0:
        seed = secrets.randbits(62)
    seeds = _seeds(seed, len(classes))
    counts = balanced_counts(half, classes, np.random.default_rng(seeds["balance"]))

    # Real half: the test split only, the same number per condition as the synthetic half.
    real_rng = np.random.default_rng(seeds["real"])
    test = dataset.mask("test")
    pixels = dataset.images(res)                                    # uint8 [N, C, res, res], memory-mapped
    entries: list[dict] = []
    for name in classes:
        candidates = np.flatnonzero(test & (dataset.labels == dataset.classes.index(name)))
        if len(candidates) < counts[name]:
            raise StudyError(f"the test split has {len(candidates)} {name} image(s); this study needs {counts[name]}. "
                             f"Ask for fewer images (--images) or prepare a larger test split")
        for index in sorted(real_rng.choice(candidates, size=counts[name], replace=False).tolist()):
            entries.append({"kind": "real", "condition": name, "dataset_index": int(index),
                            "pixels": np.asarray(pixels[index])})

    # Synthetic half: z_from_seed(seed of the condition, n)[row], in calls of at most max_batch.
    for k, name in enumerate(classes):
        n = counts[name]
        z = z_from_seed(seeds["synthetic"][k], n, model.z_dim)      # [n, z_dim]
        out = []
        for start in range(0, n, max(1, int(source.max_batch))):
            batch = z[start:start + source.max_batch]
            out.append(np.asarray(source.generate(batch, np.full(len(batch), k, dtype=np.int64))))
        generated = np.concatenate(out)                             # [n, C, H, W] in [-1, 1]
        if generated.shape != (n, model.img_channels, res, res) or not np.isfinite(generated).all():
            raise StudyError(f"the generator returned {generated.shape} (expected {(n, model.img_channels, res, res)}) "
                             "or non-finite values")
        for row, image in enumerate(to_uint8(generated)):
            entries.append({"kind": "synthetic", "condition": name, "seed": seeds["synthetic"][k], "row": row,
                            "pixels": image})

    order_rng = np.random.default_rng(seeds["order"])
    entries = [entries[i] for i in order_rng.permutation(len(entries))]
    orders = [order_rng.permutation(len(entries)).tolist() for _ in range(readers)]
    tokens = [new_token() for _ in range(readers)]

    created = datetime.now(timezone.utc)
    study_id = f"{created:%Y%m%d-%H%M%S}-v{model.version}-{secrets.token_hex(2)}"
    root = studies_root(params) / study_id
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir()
        items = []
        for i, entry in enumerate(entries):
            path = tmp / "images" / f"{i:04d}.png"
            path.write_bytes(png_bytes(entry.pop("pixels")))
            items.append({"item": i, **entry, "sha256": sha256_file(path)})
        manifest = {
            "format": FORMAT_VERSION, "study": study_id, "title": title, "created": created.isoformat(timespec="seconds"),
            "model": {**dataclasses.asdict(model), "classes": classes},
            "dataset": {"root": str(dataset_dir), "split": "test", "img_resolution": res,
                        "test_images": int(test.sum()), "meta": {k: dataset.meta.get(k) for k in ("data_md5", "source", "seed") if k in dataset.meta}},
            "design": {"images": images, "real": half, "synthetic": half, "per_condition": counts, "readers": readers},
            "seeds": seeds,
            "items": items,
            "orders": orders,
            "source": dict(extra or {}),
            "provenance": provenance(params),
        }
        write_json(tmp / "manifest.json", manifest)
        write_readers(tmp, [hash_token(t) for t in tokens])
        AnswerStore(tmp / "answers.sqlite").create()
        params.save(tmp / "params.yaml")
    return load_study(root), tokens


def reader_links(params: Params, study: Study, tokens: Sequence[str], base_url: str | None = None) -> list[str]:
    """The URL each reader opens (``study.base_url`` or the web app's host and port)."""
    host = params.web.host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: name this machine, not the wildcard
        import socket

        host = socket.gethostname()
    base = (base_url or params.study.base_url or f"http://{host}:{params.web.port}").rstrip("/")
    return [f"{base}/study/{token}" for token in tokens]


def reissue_token(study: Study, reader: int) -> str:
    """Replace reader ``reader``'s token (a lost link); their answers stay. Returns the new token."""
    if not 1 <= reader <= study.num_readers:
        raise StudyError(f"study {study.id} has readers 1..{study.num_readers}, not {reader}")
    token = new_token()
    hashes = list(study.token_hashes)
    hashes[reader - 1] = hash_token(token)
    write_readers(study.root, hashes)
    return token


def close_study(study: Study) -> None:
    """Stop accepting answers (the page then says the study is closed)."""
    from radsynth.io import write_json

    if not study.closed:
        write_json(study.root / "closed.json", {"closed": now()})


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


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


def log_report(params: Params, study: Study, report: dict, files: Sequence[Path]) -> dict:
    """Attach a report to the study's own model version: tags, artefacts on its run, card section.

    The version is looked up by number (never by alias) and must still hold the ONNX the study
    was made with.

    Raises:
        StudyError: the version is gone, or its ``onnx_sha256`` differs from the study's.
    """
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(params)
    name, version = study.model_name, study.model_version
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise StudyError(f"models:/{name}/{version} is not in the registry at {params.paths.mlflow_uri}; "
                         "the report was written but not logged") from None
    expected = study.manifest["model"].get("onnx_sha256", "")
    actual = (mv.tags or {}).get("onnx_sha256", "")
    if expected and actual != expected:
        raise StudyError(f"models:/{name}/{version} now holds ONNX {actual[:12]}..., not the {expected[:12]}... this study "
                         "was made with; the report was written but not logged")
    tags = report_tags(report)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    artifact_path = f"{ARTIFACT_DIR}/{study.id}"
    if mv.run_id:
        for path in files:
            client.log_artifact(mv.run_id, str(path), artifact_path=artifact_path)
    description = with_card_section(mv.description, card_section(report))
    client.update_model_version(name, str(version), description=description)
    return {"model": name, "version": version, "tags": tags, "run_id": mv.run_id or None,
            "artifact_path": artifact_path if mv.run_id else None}


def report_study(params: Params, study: Study, log_mlflow: bool | None = None) -> dict:
    """Compute a study's report, write ``report.md`` + ``report.json`` (atomically) beside it and,
    with ``log_mlflow`` (default ``study.log_mlflow``), attach it to the model version.

    Returns:
        The report dict, with ``mlflow`` (what was logged, or ``None``).
    """
    from radsynth.io import atomic_write_text, write_json

    from radsynth.study_stats import CI_METHODS

    cfg = params.study
    if cfg.ci_method not in CI_METHODS or not 0.0 < cfg.ci_level < 1.0:
        raise StudyError(f"study.ci_method must be one of {', '.join(CI_METHODS)} and study.ci_level in (0, 1); "
                         f"got {cfg.ci_method!r}, {cfg.ci_level!r}")
    report = compute_report(study, study.answers().all(), cfg.ci_level, cfg.ci_method)
    out = study.root / "report"
    md_path = atomic_write_text(out / "report.md", format_markdown(report))
    json_path = write_json(out / "report.json", report)
    logged = None
    if cfg.log_mlflow if log_mlflow is None else log_mlflow:
        logged = log_report(params, study, report, [md_path, json_path])
        write_json(out / "mlflow.json", logged)
    return {**report, "mlflow": logged}


def latest_report(params: Params, model_name: str, version: int) -> dict | None:
    """The newest written report of a study on exactly ``model_name`` version ``version``, if any."""
    from radsynth.io import read_json

    found = None
    for study in list_studies(studies_root(params)):
        path = study.root / "report" / "report.json"
        if study.model_name == model_name and study.model_version == int(version) and path.is_file():
            report = read_json(path)
            if found is None or report.get("reported", "") >= found.get("reported", ""):
                found = report
    return found


def card_section_for(params: Params, model_name: str, version: int) -> str | None:
    """:func:`card_section` of the newest report on that exact version, or ``None`` (for the model card)."""
    report = latest_report(params, model_name, version)
    return None if report is None else card_section(report)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

ACTIONS = ("create", "list", "report", "close", "reissue")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="create | list | report | close | reissue")
    parser.add_argument("--readers", type=int, default=None, help="create: number of readers (default study.readers)")
    parser.add_argument("--images", type=int, default=None, help="create: number of images, even: half real, half synthetic (default study.images)")
    parser.add_argument("--alias", default=None, help="create: registry alias to resolve once (default registry.champion_alias)")
    parser.add_argument("--version", type=int, default=None, help="create: a registry version number instead of an alias")
    parser.add_argument("--seed", type=int, default=None, help="create: study seed (default study.seed; -1: fresh, recorded)")
    parser.add_argument("--title", default="", help="create: a title shown to readers")
    parser.add_argument("--url", default=None, help="create: Triton host:port (default serve.url or serve.host + port)")
    parser.add_argument("--dataset", default=None, help="create: the prepared dataset (default <paths.artifacts>/dataset)")
    parser.add_argument("--base-url", default=None, help="create/reissue: web app address for the reader links (default study.base_url)")
    parser.add_argument("--study", default=None, help="report/close/reissue: study id (default: the newest study)")
    parser.add_argument("--reader", type=int, default=None, help="reissue: the reader number whose link is replaced")
    parser.add_argument("--no-mlflow", action="store_true", help="report: write the files only; do not log to the registry")


def _print_links(links: Sequence[str]) -> None:
    print("Reader links (shown once: only their hashes are kept; give each to one reader):")
    for reader, link in enumerate(links, start=1):
        print(f"  reader {reader}: {link}")


def run(args: argparse.Namespace) -> int:
    from radsynth.cli import load_cli_params

    params = load_cli_params(args)
    root = studies_root(params)
    if args.action == "create":
        if args.alias and args.version is not None:
            raise StudyError("pass --alias or --version, not both")
        readers = params.study.readers if args.readers is None else args.readers
        images = params.study.images if args.images is None else args.images
        model = resolve_model(params, alias=args.alias, version=args.version)
        check_design(readers, images, len(model.classes))
        source = TritonSource(params, model, url=args.url)
        try:
            study, tokens = create_study(
                params, model, source, readers=readers, images=images, seed=args.seed, title=args.title, dataset_dir=args.dataset,
                extra={"triton_url": source.url, "served_sha256_checked": source.sha256_checked},
            )
        finally:
            source.close()
        reached = f"@{model.alias} -> " if model.alias else ""
        print(f"study {study.id}: {model.name} {reached}v{model.version} (gate {model.gate or 'not recorded'}), "
              f"{study.num_images} images ({study.num_images // 2} real from the test split, {study.num_images // 2} synthetic), "
              f"{study.num_readers} readers")
        print(f"manifest (the answer key; keep it from the readers): {study.root / 'manifest.json'}")
        _print_links(reader_links(params, study, tokens, args.base_url))
        print(f"Serve the page with `radsynth web`; afterwards `radsynth study report --study {study.id}`.")
        return 0
    if args.action == "list":
        studies = list_studies(root)
        if not studies:
            print(f"no studies under {root}")
        for study in studies:
            answers = study.answers().all()
            state = "closed" if study.closed else "open"
            print(f"{study.id}  {study.model_name} v{study.model_version}  {study.num_readers} readers x {study.num_images} images  "
                  f"{len(answers)}/{study.num_readers * study.num_images} answers  {state}")
        return 0
    study = find_study(root, args.study)
    if args.action == "close":
        close_study(study)
        print(f"study {study.id} is closed; its page no longer accepts answers")
        return 0
    if args.action == "reissue":
        if args.reader is None:
            raise StudyError("reissue needs --reader N")
        token = reissue_token(study, args.reader)
        print(f"reader {args.reader}'s old link no longer works; their {sum(a.reader == args.reader for a in study.answers().all())} answers are kept.")
        print(f"  reader {args.reader}: {reader_links(params, study, [token], args.base_url)[0]}")
        return 0
    report = report_study(params, study, log_mlflow=False if args.no_mlflow else None)
    for sentence in report["interpretation"]:
        print(sentence)
    print(f"report: {study.root / 'report' / 'report.md'} (+ report.json)")
    if report["mlflow"]:
        m = report["mlflow"]
        print(f"logged to {m['model']} version {m['version']}: {len(m['tags'])} tags, the model card section"
              + (f", artefacts under {m['artifact_path']} of run {m['run_id']}" if m["run_id"] else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from radsynth.cli import main

    sys.exit(main(["study", *sys.argv[1:]]))
