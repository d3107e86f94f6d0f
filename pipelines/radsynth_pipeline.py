"""The Kubeflow pipeline: ingest -> preprocess -> validate -> train (one task per stage) -> gate -> export -> register -> synthesize.

Task names equal the step names of ``dvc.yaml`` and ``components/`` (the training stages
are ``train``, ``train-2``, ... with display names ``train-<resolution>``). Each training
stage is its own task that takes the previous stage's checkpoint as an input artefact, so a
cluster can give each stage the GPUs it needs and a failed stage resumes from the last one.
Export, registration and synthesis run only under ``dsl.If`` on the gate's verdict; the
synthesis task makes a synthetic dataset from exactly the version registered.

The stage list comes from the params the pipeline is built with, so a pipeline is compiled
for one profile (``radsynth pipeline compile --profile gpu`` writes the committed IR).
No ``from __future__ import annotations`` here: KFP reads the pipeline signature's types.
"""

from typing import Any, Callable

from kfp import dsl
from kfp import kubernetes

from pipelines.component import image_ref
from pipelines.steps import COMPONENTS
from radsynth.config import Params, PipelineConfig

PIPELINE_NAME = "radsynth-pipeline"
STEPS = ("ingest", "preprocess", "validate", "train", "evaluate", "export", "encoder", "register", "synthesize")
MLFLOW_ENV = "MLFLOW_TRACKING_URI"
SALT_KEY = "RADSYNTH_SALT"   # key in the pipeline.salt_secret Secret
SIGNING_KEY = "RADSYNTH_SIGNING_KEY"   # key in the pipeline.signing_secret Secret (register step only)


def component(step: str, image: str | None = None) -> Any:
    """The KFP component of ``step``: ``pipelines.steps.<step>_component``.

    Its component name is set to the step name, so the task names in the compiled IR are
    the step names (the contract with ``dvc.yaml``); ``image`` (``name:tag``) replaces the
    base image it was declared with.
    """
    comp = COMPONENTS[step]
    comp.component_spec.name = comp.name = step
    if image:
        comp.component_spec.implementation.container.image = image
    return comp


def stage_resolutions(params: Params) -> list[int]:
    """Resolutions of the progressive stages, lowest first (one training task each).

    The trainer's own schedule: powers of two from ``train.start_resolution`` to
    ``train.final_resolution`` (0: ``data.img_resolution``) for a progressive variant, one
    full-resolution stage for a non-progressive one (``dcgan``).
    """
    from model.schedule import stage_resolutions as resolutions   # torch-free

    return resolutions(params.train, params.data.img_resolution, params.model.variant)


def _limits(task: dsl.PipelineTask, cpu: str, memory: str, cfg: PipelineConfig) -> None:
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    kubernetes.set_image_pull_policy(task, cfg.image_pull_policy)
    kubernetes.set_timeout(task, cfg.timeout_s)


def _tracking(task: dsl.PipelineTask, cfg: PipelineConfig) -> None:
    if cfg.mlflow_uri:
        task.set_env_variable(MLFLOW_ENV, cfg.mlflow_uri)
    if cfg.mlflow_auth_secret:  # MLflow runs behind authentication on a cluster
        kubernetes.use_secret_as_env(task, secret_name=cfg.mlflow_auth_secret, secret_key_to_env={
            "username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"})


def _train_resources(task: dsl.PipelineTask, cfg: PipelineConfig) -> None:
    _limits(task, cfg.train_cpu, cfg.train_memory, cfg)
    if cfg.train_gpus > 0:
        task.set_accelerator_type(cfg.gpu_resource).set_accelerator_limit(cfg.train_gpus)
    if cfg.gpu_node_selector:
        key, _, value = cfg.gpu_node_selector.partition("=")
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if cfg.gpu_toleration:
        kubernetes.add_toleration(task, key=cfg.gpu_toleration, operator="Exists", effect="NoSchedule")
    if cfg.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cfg.shm_size)


def build_pipeline(params: Params) -> Callable:
    """Build ``radsynth_pipeline`` for one resolved config.

    Args:
        params: the resolved config; its profile becomes the ``profile`` default and its
            schedule decides the training tasks.

    Returns:
        The ``@dsl.pipeline`` function (parameters ``profile``, ``overrides``, ``raw_dir``,
        ``promote``).
    """
    cfg = params.pipeline
    stages = stage_resolutions(params)
    raw_default = cfg.data_mount if cfg.data_pvc else params.paths.raw
    image = image_ref(cfg)
    ingest_c, preprocess_c, validate_c, train_c, evaluate_c, export_c, encoder_c, register_c, synthesize_c = (
        component(s, image) for s in STEPS)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"radsynth: DICOM export to a registered conditional GAN ({params.profile} profile, stages {stages})",
    )
    def radsynth_pipeline(
        profile: str = params.profile,
        overrides: list = [],
        raw_dir: str = raw_default,
        promote: bool = True,
    ):
        common = {"profile": profile, "overrides": overrides}
        ingest = ingest_c(raw_dir=raw_dir, **common)
        _limits(ingest, cfg.step_cpu, cfg.step_memory, cfg)
        if cfg.data_pvc:
            kubernetes.mount_pvc(ingest, pvc_name=cfg.data_pvc, mount_path=cfg.data_mount)
        if cfg.salt_secret:
            kubernetes.use_secret_as_env(ingest, secret_name=cfg.salt_secret,
                                         secret_key_to_env={SALT_KEY: params.data.salt_env})

        preprocess = preprocess_c(ingest=ingest.outputs["ingest"], **common)
        _limits(preprocess, cfg.step_cpu, cfg.step_memory, cfg)
        dataset = preprocess.outputs["dataset"]

        validate = validate_c(dataset=dataset, **common)
        _limits(validate, cfg.step_cpu, cfg.step_memory, cfg)

        checkpoint = None
        for resolution in stages:
            extra = {"previous": checkpoint} if checkpoint is not None else {}
            train = train_c(resolution=resolution, dataset=dataset, **extra, **common)
            train.after(validate)
            train.set_display_name(f"train-{resolution}")
            _train_resources(train, cfg)
            _tracking(train, cfg)
            checkpoint = train.outputs["checkpoint"]

        evaluate = evaluate_c(dataset=dataset, checkpoint=checkpoint, **common)
        _limits(evaluate, cfg.train_cpu, cfg.train_memory, cfg)
        _tracking(evaluate, cfg)

        # The local runner resolves only a component's single `Output` in conditions.
        with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition, not Python)
            export = export_c(checkpoint=checkpoint, **common)
            _limits(export, cfg.step_cpu, cfg.step_memory, cfg)
            encoder = encoder_c(register=True, dataset=dataset, checkpoint=checkpoint, onnx=export.outputs["onnx"], **common)
            _train_resources(encoder, cfg)
            _tracking(encoder, cfg)
            register = register_c(promote=promote, evaluation=evaluate.outputs["evaluation"], onnx=export.outputs["onnx"],
                                  dataset=dataset, checkpoint=checkpoint, **common)
            register.after(encoder)  # promotion moves the encoder's champion with the generator's
            _limits(register, cfg.step_cpu, cfg.step_memory, cfg)
            _tracking(register, cfg)
            if cfg.signing_secret:  # the promotion is signed here, and only here (radsynth/signing.py)
                kubernetes.use_secret_as_env(register, secret_name=cfg.signing_secret,
                                             secret_key_to_env={SIGNING_KEY: params.signing.key_env})
            synthesize = synthesize_c(version=register.outputs["Output"], **common)
            _limits(synthesize, cfg.step_cpu, cfg.step_memory, cfg)
            _tracking(synthesize, cfg)
            if cfg.signing_public_configmap:  # its private Triton verifies the signature with the public key only
                kubernetes.use_config_map_as_env(synthesize, config_map_name=cfg.signing_public_configmap,
                                                 config_map_key_to_env={"public_key": params.signing.public_key_env})

    return radsynth_pipeline
