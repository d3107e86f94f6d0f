"""The Kubeflow components: one per step, each a few lines around its ``components/<step>.py`` function.

The step modules themselves know nothing of Kubeflow (a plain ``radsynth <step>`` never
imports kfp); here each step becomes a KFP lightweight component (:func:`~pipelines.component.step_component`)
whose body imports the step's function inside the task, lays its input artefacts out as an
artefacts root (:func:`~pipelines.workspace.step_workspace`) and publishes the outputs.
:data:`COMPONENTS` maps step names to them for ``pipelines/radsynth_pipeline.py``.

KFP copies each function's source into the compiled IR and runs it in the project image, so
a body may use only its own imports (kfp's ``Input``/``Output`` types are in scope there).
"""

from __future__ import annotations

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.component import step_component

@step_component
def ingest_component(profile: str, overrides: list, raw_dir: str, ingest: Output[Artifact], metrics: Output[Metrics]):
    """KFP: decode and de-identify the export under ``raw_dir`` into the ``ingest`` artefact."""
    from components.ingest import format_summary
    from components.ingest import ingest as run_ingest
    from pipelines.workspace import raw_overrides, step_workspace

    moved = raw_overrides(profile, overrides, raw_dir)
    with step_workspace(profile, overrides, outputs={"ingest": ingest.path}, metrics=metrics,
                        metrics_file="ingest.json", extra_overrides=moved) as ws:
        print(format_summary(run_ingest(ws.params)))


@step_component
def preprocess_component(profile: str, overrides: list, ingest: Input[Artifact], dataset: Output[Dataset],
                         metrics: Output[Metrics]):
    """KFP: the ``ingest`` artefact -> the prepared ``dataset`` (levels, patient-level split)."""
    from components.preprocess import preprocess
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"ingest": ingest.path}, outputs={"dataset": dataset.path},
                        metrics=metrics, metrics_file="preprocess.json") as ws:
        preprocess(ws.params)


@step_component
def validate_component(profile: str, overrides: list, dataset: Input[Dataset], validate: Output[Artifact],
                       metrics: Output[Metrics]):
    """KFP: Great Expectations over the ``dataset``; a failed expectation fails the run."""
    from components.validate import validate as run_validate
    from pipelines.workspace import StepFailed, step_workspace

    with step_workspace(profile, overrides, inputs={"dataset": dataset.path}, outputs={"validate": validate.path}) as ws:
        result = run_validate(ws.params)
        metrics.log_metric("expectations", float(result.evaluated))
        metrics.log_metric("failed", float(len(result.failed)))
        if not result.success:
            raise StepFailed(f"dataset validation failed: {', '.join(result.failed)} (see the validate artefact's summary.md)")


@step_component
def train_component(profile: str, overrides: list, resolution: int, dataset: Input[Dataset], checkpoint: Output[Model],
                    metrics: Output[Metrics], progress: Output[HTML], previous: Input[Model] = None):
    """KFP: one progressive stage at ``resolution``, resuming from the ``previous`` stage's checkpoint;
    ``progress``: the stage's sample grids (every train.grid_kimg) as an HTML visualisation."""
    from components.train import progress_html, train
    from model.trainer import stage_dir
    from pipelines.workspace import log_metrics, step_workspace
    from radsynth.io import atomic_write_text

    inputs = {"dataset": dataset.path, "train": previous.path if previous else None}
    with step_workspace(profile, overrides, inputs=inputs, outputs={"train": checkpoint.path}) as ws:
        summary = train(ws.params, ws.root / "dataset", ws.root / "train", stage=resolution)
        log_metrics(metrics, {"kimg": summary.get("kimg"), "seconds": summary.get("seconds"), **(summary.get("last") or {})})
        atomic_write_text(progress.path, progress_html(stage_dir(ws.root / "train", resolution), resolution))


@step_component
def evaluate_component(profile: str, overrides: list, dataset: Input[Dataset], checkpoint: Input[Model],
                       evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown],
                       pictures: Output[HTML], confusion: Output[ClassificationMetrics]) -> bool:
    """KFP: metrics and the gate on the last stage's ``G_ema``; returns the verdict for ``dsl.If``.

    The run page shows the gate report (Markdown), the pictures (HTML) and the judge's
    confusion matrix on generated images (ClassificationMetrics) beside the metrics.
    """
    import json as _json
    import shutil as _shutil

    from components.evaluate import evaluate
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"dataset": dataset.path, "train": checkpoint.path},
                        outputs={"evaluate": evaluation.path}, metrics=metrics) as ws:
        result = evaluate(ws.params, progress=True)
        print(result.gate.summary())
        _shutil.copyfile(result.out_dir / "gate.md", report.path)
        _shutil.copyfile(result.out_dir / "report.html", pictures.path)
        summary = _json.loads((result.out_dir / "evaluate.json").read_text())
        confusion.log_confusion_matrix(summary["classes"], summary["protocol"]["confusion"]["matrix"])
    return bool(result.passed)


@step_component
def export_component(profile: str, overrides: list, checkpoint: Input[Model], onnx: Output[Model], metrics: Output[Metrics]):
    """KFP: ``G_ema`` to ONNX with the parity check; ``export.json`` carries the sha256."""
    from components.export import export
    from pipelines.workspace import log_metrics, step_workspace

    with step_workspace(profile, overrides, inputs={"train": checkpoint.path}, outputs={"export": onnx.path}) as ws:
        record = export(ws.params)
        log_metrics(metrics, record.get("parity") or {})


@step_component
def encoder_component(profile: str, overrides: list, register: bool, dataset: Input[Dataset], checkpoint: Input[Model],
                      onnx: Input[Model], encoder: Output[Model], metrics: Output[Metrics]):
    """KFP: train the encoder on the frozen ``G_ema``, export ``encoder.onnx`` (+ register it)."""
    from components.encoder import encoder as run_encoder
    from pipelines.workspace import log_metrics, step_workspace

    inputs = {"dataset": dataset.path, "train": checkpoint.path, "export": onnx.path}
    with step_workspace(profile, overrides, inputs=inputs, outputs={"encoder": encoder.path}) as ws:
        summary = run_encoder(ws.params, register=register, progress=False)
        log_metrics(metrics, {k: summary[k] for k in ("recon_ssim", "recon_ssim_random_z", "recon_mse", "final_loss")})


@step_component
def register_component(profile: str, overrides: list, promote: bool, evaluation: Input[Artifact], onnx: Input[Model],
                       dataset: Input[Dataset], checkpoint: Input[Model], model_card: Output[Markdown]) -> str:
    """KFP: register the ONNX generator as ``candidate``; with ``promote``, move ``champion`` to it.

    The model card is also this task's Markdown output, so the run page shows it.
    """
    import os
    import shutil

    from components.register import promote as promote_version
    from components.register import register
    from pipelines.workspace import step_workspace

    inputs = {"evaluate": evaluation.path, "export": onnx.path, "dataset": dataset.path, "train": checkpoint.path}
    with step_workspace(profile, overrides, inputs=inputs) as ws:
        record = register(ws.params)
        os.makedirs(os.path.dirname(model_card.path), exist_ok=True)
        shutil.copyfile(ws.root / "register" / "model_card.md", model_card.path)
        print(f"registered {record['model']} version {record['version']} (@{record['alias']}, gate {record['gate']})")
        if promote:
            promote_version(ws.params, int(record["version"]))
    return str(record["version"])


@step_component
def synthesize_component(profile: str, overrides: list, version: str, synthetic: Output[Dataset], datasheet: Output[Markdown]):
    """KFP: a synthetic dataset from registered ``version`` through a private Triton; the datasheet is a Markdown output."""
    import os
    import shutil

    from components.synthesize import synthesize
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, outputs={"synthesize": synthetic.path}) as ws:
        record = synthesize(ws.params, version=int(float(version)))
        os.makedirs(os.path.dirname(datasheet.path), exist_ok=True)
        shutil.copyfile(ws.root / "synthesize" / "datasheet.md", datasheet.path)
        print(f"synthesized {record['images']} images of {record['model']} v{record['version']}: {record['counts']}")


# step name (= dvc.yaml stage = components/<step>.py = KFP task name) -> its component
COMPONENTS = {
    "ingest": ingest_component,
    "preprocess": preprocess_component,
    "validate": validate_component,
    "train": train_component,
    "evaluate": evaluate_component,
    "export": export_component,
    "encoder": encoder_component,
    "register": register_component,
    "synthesize": synthesize_component,
}
