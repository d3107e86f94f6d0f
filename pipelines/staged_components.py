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
    """KFP: one progressive stage at ``resolution``, resuming from the previous stage's checkpoint."""
    from pipelines.workspace import step_workspace

    inputs = {"dataset": dataset.path, "train": previous.path if previous else None}
    with step_workspace(profile, overrides, inputs=inputs, outputs={"train": checkpoint.path}, metrics=metrics) as ws:
        ws.check("train", "--stage", str(resolution))


@step_component
def evaluate_component(profile: str, overrides: list, dataset: Input[Dataset], checkpoint: Input[Model],
                       evaluation: Output[Artifact], metrics: Output[Metrics]) -> bool:
    """KFP: metrics and the gate; returns the verdict (the pipeline branches on it with dsl.If)."""
    from pipelines.workspace import StepFailed, step_workspace
    from radsynth.metric_keys import GATE_PASSED

    with step_workspace(profile, overrides, inputs={"dataset": dataset.path, "train": checkpoint.path},
                        outputs={"evaluate": evaluation.path}, metrics=metrics) as ws:
        status = ws.run("evaluate")
        verdict = ws.read_metrics("evaluate").get(GATE_PASSED)
        if verdict is None:  # no verdict written: the evaluation itself failed
            raise StepFailed(f"radsynth evaluate exited with status {status} and wrote no {GATE_PASSED}")
    return bool(verdict == 1.0)


@step_component
def export_component(profile: str, overrides: list, checkpoint: Input[Model], onnx: Output[Model], metrics: Output[Metrics]):
    """KFP: G_ema to ONNX with a parity check; the file's sha256 is in export.json."""
    from pipelines.workspace import step_workspace

    with step_workspace(profile, overrides, inputs={"train": checkpoint.path}, outputs={"export": onnx.path}, metrics=metrics) as ws:
        ws.check("export")


@step_component
def register_component(profile: str, overrides: list, promote: bool, dataset: Input[Dataset], checkpoint: Input[Model],
                       evaluation: Input[Artifact], onnx: Input[Model]) -> str:
    """KFP: register the ONNX generator in MLflow as ``candidate``; ``promote`` moves ``champion`` to it."""
    from pipelines.workspace import step_workspace
    from radsynth.io import read_json

    inputs = {"dataset": dataset.path, "train": checkpoint.path, "evaluate": evaluation.path, "export": onnx.path}
    with step_workspace(profile, overrides, inputs=inputs) as ws:
        ws.check("register")
        version = str(read_json(ws.root / "register" / "register.json")["version"])
        if promote:
            ws.check("promote", "--version", version)
    return version
