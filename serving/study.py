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

``report`` computes per reader and pooled (``serving/study_report.py``; the statistics are in
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
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from radsynth import registry
from radsynth.config import Params
from serving.study_report import card_section, compute_report, format_markdown, report_tags, with_card_section
from serving.study_store import (
    FORMAT_VERSION, AnswerStore, Study, StudyError, find_study, hash_token, list_studies, load_study, new_token, now,
    studies_root, write_readers,
)

MAX_READERS = 200
MAX_IMAGES = 2000
ARTIFACT_DIR = "reader_study"                 # artefact folder of reports on the model version's run


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


def resolve_model(params: Params, alias: str | None = None, version: int | None = None,
                  model_name: str | None = None) -> ModelRef:
    """Resolve ``models:/<name>@<alias>`` (default ``registry.champion_alias``) or ``<name>/<version>``.

    Raises:
        StudyError: no such alias or version, or the version lacks the tags a study needs.
    """
    from mlflow.exceptions import MlflowException

    name = model_name or params.registry.model_name
    client = registry.client(params)
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

        self.client = Client.from_params(params, url=url)
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


def log_report(params: Params, study: Study, report: dict, files: Sequence[Path]) -> dict:
    """Attach a report to the study's own model version: tags, artefacts on its run, card section.

    The version is looked up by number (never by alias) and must still hold the ONNX the study
    was made with.

    Raises:
        StudyError: the version is gone, or its ``onnx_sha256`` differs from the study's.
    """
    from mlflow.exceptions import MlflowException

    client = registry.client(params)
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
