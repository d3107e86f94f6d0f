"""KFP components for steps whose module in ``components/`` does not declare one yet.

Per the project layout each ``components/<step>.py`` ends with its KFP component
(``<step>_component``). While a step module is still being written, the component is staged
here with exactly the text it will have there; :func:`pipelines.radsynth_pipeline.component`
prefers the step module's own. Remove an entry once its module carries it.
"""

from __future__ import annotations

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.component import step_component


@step_component
def train_component(profile: str, overrides: list, resolution: int, dataset: Input[Dataset], checkpoint: Output[Model],
                    metrics: Output[Metrics], previous: Input[Model] = None):
    """KFP: one progressive stage at ``resolution``, resuming from the ``previous`` stage's checkpoint."""
    from components.train import train
    from pipelines.workspace import log_metrics, step_workspace

    inputs = {"dataset": dataset.path, "train": previous.path if previous else None}
    with step_workspace(profile, overrides, inputs=inputs, outputs={"train": checkpoint.path}) as ws:
        summary = train(ws.params, ws.root / "dataset", ws.root / "train", stage=resolution)
        log_metrics(metrics, {"kimg": summary.get("kimg"), "seconds": summary.get("seconds"), **(summary.get("last") or {})})


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


@step_component
def export_component(profile: str, overrides: list, checkpoint: Input[Model], onnx: Output[Model], metrics: Output[Metrics]):
    """KFP: ``G_ema`` to ONNX with the parity check; ``export.json`` carries the sha256."""
    from components.export import export
    from pipelines.workspace import log_metrics, step_workspace

    with step_workspace(profile, overrides, inputs={"train": checkpoint.path}, outputs={"export": onnx.path}) as ws:
        record = export(ws.params)
        log_metrics(metrics, record.get("parity") or {})


@step_component
def register_component(profile: str, overrides: list, promote: bool, evaluation: Input[Artifact], onnx: Input[Model]) -> str:
    """KFP: register the ONNX generator as ``candidate``; with ``promote``, move ``champion`` to it."""
    from components.register import promote as promote_version
    from components.register import register
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"evaluate": evaluation.path, "export": onnx.path}) as ws:
        record = register(ws.params)
        print(f"registered {record['model']} version {record['version']} (@{record['alias']}, gate {record['gate']})")
        if promote:
            promote_version(ws.params, int(record["version"]))
    return str(record["version"])
