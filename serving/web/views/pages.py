"""Blueprint ``pages``: the form (``/``), ``POST /generate``, ``POST /regenerate``, the permalink
(``/result``) and the download links (``/download``) of a result page."""

from __future__ import annotations

import io

from flask import Blueprint, render_template, request, send_file, url_for

from radsynth.latent import new_seed
from serving.web import generation, metrics_view
from serving.web.backend import ModelInfo
from serving.web.forms import check_csrf, form_page, parse_choice
from serving.web.state import FormError, WebState, web_state
from serving.web.uploads import Domain, Reference, UploadError, read_upload

bp = Blueprint("pages", __name__)
DOWNLOADS = {"png": "image/png", "dicom": "application/dicom", "zip": "application/zip"}
ZOOM_TARGET_PX = 224                           # gallery tiles: the integer enlargement nearest this width
STRIP_TARGET_PX = 128                          # one-seed strip tiles


@bp.get("/")
def index():
    return form_page(web_state().backend.model_info())


@bp.post("/generate")
def generate():
    state = web_state()
    cfg = state.cfg
    info = state.backend.model_info()
    values = request.form.to_dict()
    try:
        check_csrf()
        condition, n, seed = parse_choice(info, request.form)
        upload = request.files.get("image")
        ref = None
        if upload is not None and upload.filename:
            data = upload.read()
            ref = read_upload(data, max_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_pixels,
                              resolution=info.img_resolution, channels=info.img_channels,
                              domain=Domain.from_config(cfg), max_inflated_bytes=cfg.max_inflated_bytes)
            del data
            state.store(ref)
    except (FormError, UploadError) as exc:
        return form_page(info, str(exc), exc.status, values)
    return result_page(state, info, condition, n, seed, ref, "upload" if ref is not None else "form")


@bp.post("/regenerate")
def regenerate():
    state = web_state()
    info = state.backend.model_info()
    values = request.form.to_dict()
    try:
        check_csrf()
        condition, n, _ = parse_choice(info, {**values, "seed": ""})
        token = request.form.get("reference", "")
        ref = state.unpack_reference(token, info) if token else None
    except FormError as exc:
        return form_page(info, str(exc), exc.status, values)
    return result_page(state, info, condition, n, new_seed(), ref, "regenerate")


@bp.get("/result")
def result():
    info = web_state().backend.model_info()
    try:
        condition, n, seed = parse_choice(info, request.args)
        if not (request.args.get("seed") or "").strip():
            raise FormError("A permalink needs its seed (…&seed=123).", 400)
    except FormError as exc:
        return form_page(info, str(exc), exc.status, request.args.to_dict())
    return result_page(web_state(), info, condition, n, seed, None, "permalink")


@bp.get("/download")
def download():
    state = web_state()
    info = state.backend.model_info()
    args = request.args
    try:
        condition, n, seed = parse_choice(info, args)
        fmt = args.get("format", "")
        if fmt not in DOWNLOADS or not (args.get("seed") or "").strip():
            raise FormError("A download link names a format (png, dicom or zip) and its seed; use the links on a result page.", 400)
        if args.get("v") != info.version:
            raise FormError(f"The served model changed since this page was made (version {args.get('v')} -> "
                            f"{info.version}). Generate again.", 409)
        index = None
        if fmt != "zip":
            try:
                index = int(args.get("i", ""))
            except ValueError:
                index = -1
            if not 0 <= index < n:
                raise FormError(f"Image index must be between 0 and {n - 1}.", 400)
        z0 = state.open_latent(args["r"], info) if args.get("r") else None
    except FormError as exc:
        return render_template("error.html", status=exc.status, title="This download cannot be made", message=str(exc),
                               hint=None, retry=url_for("pages.index")), exc.status
    images = generation.images(state.backend, info, condition, n, seed, state.cfg.latent_jitter, z0)  # [n, C, H, W]
    state.audit.write(event="download", model=info.name, version=info.version, alias=info.alias, condition=condition,
                      seed=seed, n=n, format=fmt, upload=z0 is not None)
    if fmt == "zip":
        blob = generation.zip_bundle(images, info, condition, seed, z0 is not None, state.body_part)
        name = generation.file_stem(info, condition, seed, 0)[:-3] + ".zip"
    elif fmt == "png":
        blob, name = generation.png_bytes(images[index]), generation.file_stem(info, condition, seed, index) + ".png"
    else:
        files, note = generation.dicom_bytes(images[index:index + 1], info, condition, seed, state.body_part, [index])
        if files is None:
            return render_template("error.html", status=501, title="DICOM unavailable", message=note, hint=None,
                                   retry=url_for("pages.index")), 501
        blob, name = files[0], generation.file_stem(info, condition, seed, index) + ".dcm"
    resp = send_file(io.BytesIO(blob), mimetype=DOWNLOADS[fmt], as_attachment=True, download_name=name)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def result_page(state: WebState, info: ModelInfo, condition: str, n: int, seed: int, ref: Reference | None, source: str):
    """Generate, audit, and show the result page (facts, gallery, metrics, downloads, permalink)."""
    cfg = state.cfg
    outcome = generation.run(state.backend, info, condition, n, seed, cfg.latent_jitter,
                             reference=None if ref is None else ref.image)
    state.audit.write(
        event="generate", model=info.name, version=info.version, alias=info.alias,
        condition=condition, seed=seed, n=n, source=source, upload=ref is not None,
    )

    def download_url(fmt: str, index: int | None = None) -> str:
        query = {"condition": outcome.condition, "seed": outcome.seed, "n": outcome.n, "v": info.version, "format": fmt}
        if index is not None:
            query["i"] = index
        if outcome.z0 is not None:
            query["r"] = state.seal_latent(outcome.z0, info)
        return url_for("pages.download", **query)

    return render_template(
        "result.html", info=info, outcome=outcome, source=source,
        reference=ref, reference_state=None if ref is None else state.pack_reference(ref),
        preview=None if ref is None else generation.data_uri(generation.png_bytes(ref.image), "image/png"),
        metrics=metrics_view.rows(info.metrics, info.unavailable, condition),
        permalink=url_for("pages.result", condition=condition, seed=seed, n=n, _external=True),
        stem=lambda i: generation.file_stem(info, condition, seed, i),
        download=download_url, data_uri=generation.data_uri, closeness=closeness, max_images=cfg.max_images,
        zoom_px=ZOOM_TARGET_PX, strip_px=STRIP_TARGET_PX,
    )


def closeness(value: float | None) -> str:
    """Plain words for an SSIM between an upload and its reconstruction."""
    if value is None:
        return "unavailable"
    if value >= 0.8:
        return "close: the generated anatomy follows the upload in detail"
    if value >= 0.5:
        return "moderate: the overall anatomy and layout follow the upload, fine detail does not"
    return "loose: only the broad layout carries over from the upload"
