"""Typed configuration loaded from ``params.yaml``.

``params.yaml`` is the one source of every tunable value. It holds the base sections
(``data``, ``model``, ``train``, ...) and a ``profiles`` mapping of overlays (``tiny``,
``cpu``, ``gpu``); the selected profile is deep-merged over the base before the result is
turned into frozen dataclasses. An unknown key or a value of the wrong type is an error
that names the key and the file, so a typo can never be silently ignored.

Each section class is owned by the step that reads it; library functions take these
objects, never raw dicts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from radsynth.errors import RadsynthError

DEFAULT_PARAMS = Path("params.yaml")
PROFILE_ENV = "RADSYNTH_PROFILE"
PARAMS_ENV = "RADSYNTH_PARAMS"


class ConfigError(RadsynthError, ValueError):
    """A params file is missing, malformed, or has an unknown or mistyped key."""


# --------------------------------------------------------------------------------------
# Sections. Keep each section's fields in the order they appear in params.yaml.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PathsConfig:
    raw: str = "data"                          # DVC-tracked export (dicom/ + labels.csv)
    artifacts: str = "artifacts"               # root of every stage's outputs
    mlflow_uri: str = "sqlite:///mlruns/mlflow.db"  # tracking + registry; a server URI works too
    mlflow_artifacts: str = "mlruns/artifacts"  # artefact root used with the SQLite default


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "dicom"                      # "dicom" (export + labels file) or "folders"
    dicom_dir: str = "data/dicom"              # export root, any depth of sub-folders
    labels_csv: str = "data/labels.csv"        # accession_number,label
    image_dir: str = ""                        # class sub-folders of PNG/JPEG (source=folders)
    classes: tuple[str, ...] = ()              # empty: every label found in the data, sorted
    allowed_modalities: tuple[str, ...] = ("DX", "CR")
    allowed_body_parts: tuple[str, ...] = ("CHEST",)
    salt_env: str = "RADSYNTH_SALT"            # env var holding the pseudonym salt
    salt_file: str = ".radsynth-salt"          # fallback: created once, git-ignored
    img_resolution: int = 128                  # training resolution, power of two
    img_channels: int = 1
    min_resolution: int = 4                    # lowest progressive level written
    split_train: float = 0.8
    split_val: float = 0.1
    split_test: float = 0.1
    hflip: bool = False                        # never on by default: the heart is on the left
    workers: int = 0                           # 0: all cores
    min_class_fraction: float = 0.05           # validation: class-balance lower bound
    max_class_fraction: float = 0.9            # validation: class-balance upper bound
    folder_patient_regex: str = ""             # source=folders: patient key from the file stem (group 1); "": one patient per image
    max_image_pixels: int = 67108864           # decoded width x height cap, DICOM (Rows x Columns, codestream) and PNG/JPEG
    max_file_bytes: int = 268435456            # largest file read (a bigger one is quarantined unread)
    record_timeout_s: float = 120.0            # one record's decode may take this long; then its worker is killed
    pixel_mean_min: float = 0.05               # quality: an image whose mean intensity in [0, 1] is below is quarantined (near_black)
    pixel_mean_max: float = 0.95               # ... above: quarantined (near_white)
    pixel_std_min: float = 0.02                # ... whose std is below: quarantined (blank)
    max_quality_fraction: float = 0.05         # validate: share of images quarantined for quality at most this


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`model:` networks and variant (owner: model/)."""

    variant: str = "pgcgan-sa"                 # key of model.registry.VARIANTS: pgcgan-sa | dcgan
    z_dim: int = 128                           # latent size
    label_dim: int = 32                        # class embedding size joined with z in G
    fmap_base: int = 4096                      # channels at resolution r: fmap_base // r ...
    fmap_max: int = 256                        # ... clamped to at most fmap_max ...
    fmap_min: int = 16                         # ... and at least fmap_min
    attention_resolutions: tuple[int, ...] = (32,)  # self-attention after these G/D blocks
    equalized_lr: bool = True                  # PG-GAN equalised learning rate (runtime He scaling)
    pixel_norm: bool = True                    # PG-GAN pixel-wise feature normalisation in G
    mbstd_group: int = 4                       # minibatch stddev group size in D (0: off)
    output: str = "tanh"                       # G output to [-1, 1]: tanh | clamp
    fade_after_output: bool = True             # pgcgan-sa G fades after its output map, as the reals fade (false: before it)
    separate_label_norm: bool = True           # pgcgan-sa G pixel-normalises z and the class embedding separately
    d_embed_equalized: bool = True             # pgcgan-sa D projection embedding with equalised learning rate
    light_resolutions: tuple[int, ...] = ()    # pgcgan-sa G/D blocks with one 3x3 conv instead of two at these resolutions
    class_modulation: bool = False             # pgcgan-sa G: class-dependent per-channel gain and bias after every conv
    d_twin_classifier: bool = False            # projection D: a second class embedding that classifies fakes (TAC-GAN; needs train.class_ce)
    dcgan_conditioning: str = "projection"     # dcgan D: projection | concat (label map on input)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`train:` progressive schedule, optimiser, tracking (owner: components/train.py)."""

    recipe: str = "progan"                     # named overlay of model/train keys from params.yaml `recipes:` ("": none)
    start_resolution: int = 4                  # first trained stage (power of two >= 4)
    final_resolution: int = 0                  # last stage; 0: the dataset's img_resolution
    kimg_fade: float = 600.0                   # kimg of real images per fade-in phase (alpha 0 -> 1)
    kimg_stabilize: float = 600.0              # kimg per stabilise phase (alpha 1); first stage: only this
    batch_size: int = 32                       # default minibatch (global, split over DDP ranks)
    batch_per_resolution: dict[int, int] = dataclasses.field(    # {res: batch} overrides of batch_size
        default_factory=lambda: {4: 64, 8: 64, 16: 64, 32: 32, 64: 32, 128: 16})
    kimg_per_resolution: dict[int, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # {res: [fade, stabilize]} overrides
    lr_g: float = 1e-4                         # Adam learning rate of G
    lr_d: float = 1e-4                         # Adam learning rate of D
    lr_rampdown_kimg: float = 0.0              # last kimg of the schedule over which both lrs fall (half cosine); 0: off
    lr_rampdown_floor: float = 0.0             # lr factor at the end of the ramp-down
    beta1: float = 0.5                         # Adam beta1
    beta2: float = 0.9                         # Adam beta2
    n_critic: int = 5                          # D steps per G step
    gp_lambda: float = 10.0                    # WGAN-GP gradient penalty weight
    gp_interval: int = 1                       # lazy penalty: on every k-th critic step only, weighted k * gp_lambda
    drift_epsilon: float = 1e-3                # weight of mean(D(real)^2), keeps critic scores bounded
    mode_seeking: float = 0.0                  # weight of G's mode-seeking term (MSGAN): G-batch pairs share a class; 0: off
    class_ce: float = 0.0                      # weight of the class cross-entropy on the projection critic's logits (D: reals, G: fakes); 0: off
    class_ce_twin_g: float = 1.0               # with model.d_twin_classifier: share of G's twin term (1: TAC-GAN, 0: AC-GAN's G term)
    ema_kimg: float = 10.0                     # G_ema half-life in kimg of progress (real images shown); 0: G_ema = G
    ema_rampup: float = 0.0                    # half-life at most ema_rampup x the kimg done so far (0: off)
    ema_probes: tuple[float, ...] = ()         # extra G averages at these half-lives (kimg), saved beside G_ema; never change training
    reset_optimizers: bool = False             # fresh Adam state (G and D) at the start of every new resolution stage
    augment: tuple[str, ...] = ()              # D-input augmentations, real and fake alike: translation cutout brightness contrast
    augment_p: float = 0.0                     # probability each op is applied to an image (start value when adaptive)
    augment_target: float = 0.0                # adaptive p (ADA): target of E[sign D(real)]; 0: p stays fixed
    augment_kimg: float = 100.0                # adaptive p: kimg for p to move by 1.0
    augment_interval: int = 4                  # adaptive p: iterations between adjustments
    device: str = "auto"                       # auto | cpu | cuda | cuda:N
    ranks: int = 1                             # `radsynth train` processes (DDP, gloo on CPU); > 1: it relaunches itself under torchrun
    threads: int = 0                           # torch CPU threads per process; 0: from the machine (model.distributed.CpuThreads)
    balanced_classes: bool = False             # draw training classes uniformly (else at data frequency)
    amp: bool = True                           # bfloat16 autocast on CUDA where supported (ignored on CPU)
    checkpoint_kimg: float = 50.0              # periodic checkpoint interval (also at every stage end)
    log_kimg: float = 5.0                      # metrics / progress interval
    grid_kimg: float = 50.0                    # fixed-z grids logged every this many kimg while training (0: stage ends only)
    grid_per_class: int = 8                    # fixed-z samples per condition in each grid
    grid_seed: int = 2024                      # seed of the grid's fixed z (radsynth.latent)
    tracking: bool = True                      # MLflow tracking (params, metrics, grids, curves)
    tracking_retries: int = 3                  # attempts per MLflow call before a warning (training never stops for it)
    progress: bool = True                      # tqdm progress bar


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """`eval.judge:` the domain classifier behind every domain metric, and the recipe of every
    utility classifier (TSTR, TRTR, augmentation) (owner: model/classifier.py)."""

    width: int = 16                            # channels after the strided stem; doubles per halving, capped at 4x
    depth: int = 1                             # conv layers per resolution level (the first one strided)
    max_epochs: int = 40                       # upper bound; training stops early on the real val split
    patience: int = 6                          # epochs without a better val balanced accuracy before stopping
    lr: float = 0.002                          # AdamW learning rate; halved after patience // 2 epochs without progress
    weight_decay: float = 0.0001               # AdamW weight decay
    batch: int = 64                            # minibatch
    ema: float = 0.995                         # judged and kept weights: moving average with this decay per step (0: off)
    shift: float = 0.05                        # augmentation: translation up to this fraction of the side (no flips)
    scale: float = 0.06                        # augmentation: zoom by up to this fraction
    contrast: float = 0.15                     # augmentation: contrast x (1 +- this), brightness +- half of it


@dataclasses.dataclass(frozen=True)
class UtilityConfig:
    """`eval.utility:` TSTR / TRTR and augmentation utility (reported, not gated) (owner: model/utility.py)."""

    enabled: bool = True                       # false: skip the utility classifiers (calibration always skips them)
    seeds: int = 3                             # classifiers per experiment; mean +- sd over them
    trtr_tolerance: float = 0.05               # TRTR balanced accuracy must be within this of the judge's, or evaluation fails
    augment_real_fraction: float = 0.2         # augmentation: stratified share of the real train split (scarcity)


@dataclasses.dataclass(frozen=True)
class GateLevelConfig:
    """One gate level's thresholds (`eval.gate.release`, `eval.gate.demo`)."""

    max_fid_units: float = 2.0                 # per condition: domain FID / size-matched real reference (mean of the draws)
    min_cond_acc: float = 0.4                  # per condition: judge accuracy on generated, absolute floor
    cond_acc_ratio: float = 0.75               # ... and at least this fraction of the judge's accuracy on real test images
    max_diversity: float = 0.9                 # per condition: MS-SSIM among generated images (collapse)
    min_recall: float = 0.0                    # per condition: k-NN recall (0 disables)
    max_memorisation: float = 0.05             # share of generated images closer to training than real test images are


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """`eval.gate:` which level judges this profile, and both levels' thresholds (owner: components/evaluate.py)."""

    level: str = "release"                     # release | demo: the level `passed` is judged at (release is always reported too)
    release: GateLevelConfig = GateLevelConfig()
    demo: GateLevelConfig = GateLevelConfig(max_fid_units=10.0, cond_acc_ratio=0.6)  # a model trained in minutes

    def __post_init__(self):
        if self.level not in GATE_LEVELS:
            raise ConfigError(f"eval.gate.level must be one of {', '.join(GATE_LEVELS)}, got {self.level!r}")

    def thresholds(self, level: str | None = None) -> GateLevelConfig:
        """The thresholds of ``level`` (default: the configured one)."""
        return getattr(self, level or self.level)


GATE_LEVELS = ("release", "demo")                # strictest first


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`eval:` metrics, the judge, utility and the gate (owner: components/evaluate.py)."""

    samples_per_class: int = 256               # generated images per condition
    seed: int = 2026                           # latent seed of the evaluation samples (z_from_seed); judge seed
    batch_size: int = 64                       # generator / feature-extractor batch
    inception_weights: str = ""                # pt_inception-2015-12-05 file; "": $TORCH_HOME/hub/checkpoints
    kid_subsets: int = 50                      # KID: number of subsets
    kid_subset_size: int = 100                 # KID: subset size (clipped to the smaller sample)
    prc_neighborhood: int = 3                  # k of the k-NN precision/recall
    diversity_pairs: int = 64                  # random pairs per condition for MS-SSIM diversity
    reference_draws: int = 5                   # size-matched real reference: draws of train images per condition
    memorisation_percentile: float = 1.0       # test-to-train percentile used as "too close"
    memorisation_shift: float = 0.05           # pixel memorisation tolerates shifts up to this fraction of the side (3 px at 64)
    cache_dir: str = ""                        # judge + real-image features per data version; "": <artifacts>/cache
    judge: JudgeConfig = JudgeConfig()
    utility: UtilityConfig = UtilityConfig()
    gate: GateConfig = GateConfig()
    calibrate: bool = True                     # run the calibration sets with every evaluation (cached per data + judge + gate)
    tracking: bool = True                      # log metrics, reports and pictures to an MLflow run
    enforce: bool = True                       # CLI exits non-zero when the gate fails (DVC passes --allow-fail)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`export:` ONNX export (owner: components/export.py)."""

    opset: int = 17                            # pinned ONNX opset
    dynamo: bool = False                       # torch.onnx.export exporter (False: TorchScript-based)
    parity_atol: float = 1e-4                  # max |PyTorch - ONNX Runtime| for the same z
    parity_batch: int = 4                      # images per condition in the parity check
    parity_seed: int = 0                       # z_from_seed seed of the parity check


@dataclasses.dataclass(frozen=True)
class RegistryConfig:
    """`registry:` the one section of model names and aliases, read by register, serve, web, synthesize,
    study and the pipeline (owner: components/register.py)."""

    model_name: str = "radsynth-generator"     # the generator's name in the registry, in Triton and on the web page
    classifier_name: str = "radsynth-classifier"  # the domain classifier's name (registered beside each generator)
    encoder_name: str = "radsynth-encoder"     # the image -> z encoder's name (registered by `radsynth encoder`)
    candidate_alias: str = "candidate"         # set on every new version
    champion_alias: str = "champion"           # what serving resolves; moved only through the gate
    history_tag: str = "champion_history"      # model tag: JSON list of past champion versions
    card_grid_per_class: int = 8               # model card: samples per condition in its grid (same z in every row)
    card_grid_seed: int = 7                    # model card: latent seed of that grid (radsynth.latent)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`serve:` Triton model repository, server, client (owner: serving/)."""

    models: tuple[str, ...] = ()               # every model served; empty: registry.model_name alone (filled in at load)
    onnx: dict[str, str] = dataclasses.field(default_factory=dict)  # model -> local ONNX file (skips the registry)
    aliases: tuple[str, ...] = ()              # registry aliases served, one version folder each; empty: registry.champion_alias
    repository: str = "artifacts/serve/model_repository"  # Triton model repository (built here)
    flavour: str = "cpu"                       # cpu: python backend + onnxruntime | gpu: onnxruntime_onnx, KIND_GPU
    max_batch_size: int = 64                   # largest batch one execution takes
    preferred_batch_sizes: tuple[int, ...] = ()  # dynamic batcher's targets (empty: run what is queued)
    max_queue_delay_us: int = 0                # how long a request may wait to be batched
    cpus: int = 0                              # cores Triton is given; 0: those this process may use (affinity, cgroup quota)
    instance_count: int = 0                    # model instances (per GPU on gpu); 0: derived (serving.repository.plan)
    intra_op_threads: int = 0                  # cpu: onnxruntime threads for a small batch; 0: derived
    batch_workers: int = 0                     # cpu: slices a large batch is cut into, run at once; 0: derived
    warmup: bool = True                        # model_warmup at batch 1 and max_batch_size when a model loads
    gpus: tuple[int, ...] = ()                 # gpu flavour: one instance group per listed GPU; empty: every GPU
    tensorrt: bool = False                     # gpu flavour: ONNX Runtime's TensorRT execution provider before CUDA
    tensorrt_precision: str = "FP16"           # FP16 | FP32 (TensorRT only)
    host: str = "127.0.0.1"                    # address the server binds (0.0.0.0 in a container)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002                   # Prometheus /metrics
    ready_timeout_s: float = 120.0             # `radsynth serve` waits this long for readiness
    log_verbose: int = 0                       # tritonserver --log-verbose
    url: str = ""                              # client target host:port; empty: host + the protocol's port
    protocol: str = "grpc"                     # client protocol: grpc | http
    timeout_s: float = 30.0                    # client per-request timeout
    retries: int = 3                           # client retries on transient errors (unavailable, timeout)
    backoff_s: float = 0.2                     # first retry delay; doubles each retry
    max_images_per_call: int = 64              # client: images per request (larger n is split; capped by max_batch_size)
    max_in_flight: int = 0                     # client: requests in flight for a large n; 0: 2 per served instance
    model_control: str = "explicit"            # tritonserver --model-control-mode: explicit (`radsynth deploy` swaps versions live) | poll | none
    repository_poll_s: int = 15                # poll mode: seconds between repository scans


@dataclasses.dataclass(frozen=True)
class WebConfig:
    """`web:` the web app (owner: serving/web); its encoder has its own section, `encoder:`."""

    host: str = "127.0.0.1"                    # where `radsynth web` listens (loopback by default)
    port: int = 8050                           # its port
    workers: int = 2                           # gunicorn worker processes
    threads: int = 4                           # threads per worker (gthread)
    timeout_s: int = 60                        # gunicorn worker timeout
    triton_url: str = "127.0.0.1:8001"         # Triton gRPC endpoint the client talks to
    triton_timeout_s: float = 10.0             # per-request client timeout
    model_info_ttl_s: float = 30.0             # how long registry facts are cached per worker
    max_upload_bytes: int = 16777216           # request body cap (Flask MAX_CONTENT_LENGTH too)
    max_pixels: int = 16777216                 # decoded width*height cap (decompression bombs)
    max_images: int = 8                        # images per request
    latent_jitter: float = 0.35                # z = E(x) + jitter * z_from_seed(seed): variety around the upload
    audit_log: str = "artifacts/web/audit.jsonl"  # JSON lines: time, model version, condition, seed, n
    store_uploads: bool = False                # never write uploads to disk unless true
    upload_dir: str = "artifacts/web/uploads"  # where they go when store_uploads is true
    secret_key_env: str = "RADSYNTH_WEB_SECRET"  # env var with the session/CSRF signing key
    max_inflated_bytes: int = 0                # cap on a Deflated DICOM upload's inflated body; 0: 2 x max_pixels + 1 MiB
    expected_modalities: tuple[str, ...] = ("DX", "CR")  # DICOM Modality of the training data (others: off-domain)
    expected_body_parts: tuple[str, ...] = ("CHEST",)  # BodyPartExamined of the training data
    off_domain: str = "warn"                   # an off-domain DICOM upload: warn (on the page) | refuse (422)
    registry_timeout_s: float = 2.0            # each MLflow call from the web process (no retries)
    health_timeout_s: float = 0.5              # /healthz's readiness call to Triton (answers within 1 s)
    request_deadline_s: float = 30.0           # a whole request's Triton calls together (below gunicorn's timeout_s)
    download_ttl_s: int = 3600                 # an upload-seeded page's download links work this long (and until a restart)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """`encoder:` the image -> z encoder behind the web app's uploads, trained with G_ema frozen
    (owner: components/encoder.py, model/encoder.py; its registry name is registry.encoder_name)."""

    steps: int = 2000                          # training steps (G frozen)
    batch: int = 32                            # training batch size
    lr: float = 0.001                          # Adam learning rate
    prior_weight: float = 0.001                # weight of the latent prior term mean(z**2)
    channels: int = 64                         # width of the first conv (doubles per halving, capped x8)
    opset: int = 17                            # ONNX opset of encoder.onnx


@dataclasses.dataclass(frozen=True)
class SynthesizeConfig:
    """`synthesize:` bulk synthetic datasets through Triton (owner: components/synthesize.py)."""

    per_condition: int = 100                   # images per condition (class-balanced), when total is 0
    total: int = 0                             # images in all; 0: per_condition x number of conditions
    mix: dict[str, float] = dataclasses.field(default_factory=dict)  # condition -> share of total ({}: balanced)
    seed: int = 20250                          # condition k (model class index) uses latent seed seed + k
    format: str = "png"                        # png | dicom
    url: str = ""                              # a running Triton (host:port) serving that version; "": start a private one
    out: str = ""                              # output folder; "": <paths.artifacts>/synthesize


@dataclasses.dataclass(frozen=True)
class SigningConfig:
    """`signing:` promotion signatures (owner: radsynth/signing.py; signed at promote, checked by serve)."""

    required: bool = True                      # serve refuses a registry version without a valid signature
    key_env: str = "RADSYNTH_SIGNING_KEY"      # private key (base64), from a Secret only the register step mounts
    key_file: str = ".radsynth-signing-key"    # else this git-ignored file (created on the first local promotion)
    public_key_env: str = "RADSYNTH_VERIFY_KEY"  # public key (base64) where serving verifies (Triton's init container)
    public_key_file: str = ""                  # else this file; "": derived from key_file on this machine


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """`pipeline:` Kubeflow image, resources, DVC wiring (owner: pipelines/)."""

    image: str = "ghcr.io/radsynth/radsynth"   # project image built from infra/Dockerfile
    image_tag: str = "0.1.0"                   # pin a release or a git sha; never "latest"
    image_pull_policy: str = "IfNotPresent"    # Always | IfNotPresent | Never
    namespace: str = "kubeflow"                # Kubernetes namespace of runs and PVCs
    experiment: str = "radsynth"               # KFP experiment the runs are filed under
    host: str = ""                             # KFP API URL for submit; "" -> --host or $KFP_HOST
    mlflow_uri: str = ""                       # tracking URI inside the cluster; "" -> paths.mlflow_uri
    data_pvc: str = ""                         # PVC holding the DVC-pulled export; "" -> no mount
    data_mount: str = "/mnt/data"              # where data_pvc is mounted in every task
    salt_secret: str = ""                      # Secret whose key RADSYNTH_SALT feeds ingest's salt ("" -> none)
    signing_secret: str = ""                   # Secret whose key RADSYNTH_SIGNING_KEY only the register step mounts ("" -> none)
    mlflow_auth_secret: str = ""               # Secret with MLflow username/password for tracking tasks ("" -> none)
    signing_public_configmap: str = ""         # ConfigMap (key public_key) with the verifying key, for tasks that serve ("" -> none)
    train_gpus: int = 0                        # GPUs per training-stage task; 0 -> CPU only
    gpu_resource: str = "nvidia.com/gpu"       # accelerator resource name
    gpu_node_selector: str = ""                # "label=value" that training nodes carry ("" -> any)
    gpu_toleration: str = ""                   # taint key tolerated by training tasks ("" -> none)
    train_cpu: str = "2"                       # CPU limit of a training-stage task
    train_memory: str = "8Gi"                  # memory limit of a training-stage task
    step_cpu: str = "2"                        # CPU limit of every other task
    step_memory: str = "8Gi"                   # memory limit of every other task
    shm_size: str = "2Gi"                      # /dev/shm (memory emptyDir) for training tasks
    timeout_s: int = 86400                     # per-task active deadline on the cluster


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """`study:` the reader study, a visual Turing test (owner: serving/study.py, serving/web/study.py)."""

    dir: str = ""                              # where studies live; "": <paths.artifacts>/studies
    readers: int = 3                           # default `study create --readers`
    images: int = 40                           # default `study create --images` (even: half real, half synthetic)
    seed: int = -1                             # study seed; -1: a fresh one per study (recorded in its manifest)
    ci_level: float = 0.95                     # confidence level of every interval in the report
    ci_method: str = "wilson"                  # binomial interval: wilson | exact (Clopper-Pearson)
    display_px: int = 512                      # study page: default on-screen image size (a whole multiple of its pixels)
    base_url: str = ""                         # reader links printed by `study create`; "": http://<web.host>:<web.port>
    log_mlflow: bool = True                    # `study report` tags the model version and logs the report there


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole resolved configuration."""

    profile: str = "cpu"                       # which overlay of ``profiles`` was applied
    seed: int = 1234                           # every random choice derives from this
    display_names: dict[str, str] = dataclasses.field(  # condition code -> name people read (files keep codes)
        default_factory=lambda: {"NORMAL": "Normal", "PNEUMONIA_BACTERIAL": "Bacterial pneumonia",
                                 "PNEUMONIA_VIRAL": "Viral pneumonia"})
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()

    model: ModelConfig = ModelConfig()

    train: TrainConfig = TrainConfig()

    eval: EvalConfig = EvalConfig()

    export: ExportConfig = ExportConfig()

    registry: RegistryConfig = RegistryConfig()

    serve: ServeConfig = ServeConfig()

    web: WebConfig = WebConfig()

    encoder: EncoderConfig = EncoderConfig()

    signing: SigningConfig = SigningConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()

    pipeline: PipelineConfig = PipelineConfig()

    study: StudyConfig = StudyConfig()

    def display_name(self, condition: str) -> str:
        """The human-readable name of a condition code (the code itself when none is set)."""
        return self.display_names.get(condition, condition)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON/MLflow."""
        return _to_plain(dataclasses.asdict(self))

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved config (the "params hash")."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the resolved config as YAML beside an output (atomic)."""
        from radsynth.io import atomic_write_text

        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_params(
    path: str | os.PathLike | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Params:
    """Load ``params.yaml``, apply a profile and dotted overrides, and type-check it.

    Args:
        path: the params file; default ``$RADSYNTH_PARAMS`` or ``./params.yaml``.
        profile: overlay name from the file's ``profiles``; default ``$RADSYNTH_PROFILE``
            or the file's own ``profile`` key.
        overrides: ``{"train.kimg": 2, ...}`` applied last (for tests and ``--set``).

    Returns:
        The frozen :class:`Params`.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a value has the
            wrong type, or the profile does not exist. The message names key and file.
    """
    path = Path(path or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")

    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: 'profiles' must be a mapping of overlays")
    name = profile or os.environ.get(PROFILE_ENV) or raw.get("profile", "cpu")
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none defined"
        raise ConfigError(f"{path}: unknown profile {name!r} (known: {known})")
    recipes = raw.pop("recipes", {}) or {}
    if not isinstance(recipes, dict):
        raise ConfigError(f"{path}: 'recipes' must be a mapping of named model/train overlays")
    overlay = profiles[name] or {}
    merged = _with_overrides(_deep_merge(raw, overlay, where=f"profiles.{name}", path=path), overrides, path)
    recipe = (merged.get("train") or {}).get("recipe", "") if isinstance(merged.get("train"), dict) else ""
    if recipe:
        # Layers, later wins: base sections < the recipe < the profile's overlay < --set overrides.
        layered = _deep_merge(raw, _resolve_recipe(recipes, recipe, path), where=f"recipes.{recipe}", path=path)
        merged = _with_overrides(_deep_merge(layered, overlay, where=f"profiles.{name}", path=path), overrides, path)
    merged["profile"] = name
    return _derive(_build(Params, merged, prefix="", path=path))


# Keys that moved to another section: using the old one is an error that names the new one.
MOVED_KEYS = {
    "serve.model_name": "registry.model_name",
    "web.model_name": "registry.model_name",
    "web.model_alias": "registry.champion_alias",
    "web.encoder_name": "registry.encoder_name",
    "web.classifier_name": "registry.classifier_name",
    "synthesize.alias": "registry.champion_alias (or `radsynth synthesize --alias`)",
    **{f"web.encoder_{k}": f"encoder.{k}" for k in ("steps", "batch", "lr", "prior_weight", "channels", "opset")},
}


def _derive(params: Params) -> Params:
    """Fill the values other sections take from ``registry`` when left empty (``serve.models``,
    ``serve.aliases``), so a name or alias is written once."""
    serve = params.serve
    if not serve.models or not serve.aliases:
        serve = dataclasses.replace(serve, models=serve.models or (params.registry.model_name,),
                                    aliases=serve.aliases or (params.registry.champion_alias,))
        params = dataclasses.replace(params, serve=serve)
    return params


RECIPE_SECTIONS = ("model", "train")


def _with_overrides(tree: dict, overrides: Mapping[str, Any] | None, path: Path) -> dict:
    out = copy.deepcopy(tree)
    for dotted, value in (overrides or {}).items():
        _set_dotted(out, dotted, value, path)
    return out


def _resolve_recipe(recipes: dict, name: str, path: Path, seen: tuple[str, ...] = ()) -> dict:
    """The overlay of recipe ``name``: its ``extends`` chain first, then its own ``model``/``train`` keys."""
    if not isinstance(name, str) or name not in recipes:
        known = ", ".join(sorted(recipes)) or "none defined"
        raise ConfigError(f"{path}: train.recipe {name!r} is not a recipe in 'recipes' (known: {known})")
    if name in seen:
        raise ConfigError(f"{path}: recipes.{name}: 'extends' loops ({' -> '.join((*seen, name))})")
    body = recipes[name] or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: recipes.{name} must be a mapping")
    unknown = sorted(set(body) - {*RECIPE_SECTIONS, "extends", "about"})
    if unknown:
        raise ConfigError(f"{path}: recipes.{name}: unknown key {unknown[0]!r} (a recipe holds model, train, extends, about)")
    if "recipe" in (body.get("train") or {}):
        raise ConfigError(f"{path}: recipes.{name}.train.recipe: a recipe names its parent with 'extends'")
    base = _resolve_recipe(recipes, body["extends"], path, (*seen, name)) if body.get("extends") else {}
    own = {k: body[k] for k in RECIPE_SECTIONS if body.get(k)}
    return _deep_merge(base, own, where=f"recipes.{name}", path=path)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value as YAML) from a ``--set`` flag."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.lr_g=2e-3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _deep_merge(base: dict, overlay: dict, where: str, path: Path) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{where}.{key}", path)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any, path: Path) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, values: Any, prefix: str, path: Path) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        if key in MOVED_KEYS:
            raise ConfigError(f"{path}: {key} moved to {MOVED_KEYS[key]}; set it there (once for every step)")
        hint = _closest(unknown[0], fields)
        raise ConfigError(f"{path}: unknown key {key!r}" + (f" (did you mean {prefix + hint!r}?)" if hint else ""))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, path: Path) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: {key} must be a list, got {type(value).__name__} {value!r}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(item_tp, v, f"{key}[{i}]", path) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a mapping, got {type(value).__name__}")
        k_tp, v_tp = typing.get_args(tp)
        return {_coerce(k_tp, k, key, path): _coerce(v_tp, v, f"{key}.{k}", path) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)                # YAML 1.1 reads 2e-3 (no dot) as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: {key}: unsupported type {tp!r} in the config schema")


# A plain decimal or scientific-notation number (``2e-3``, ``1E+4``, ``.5``): never nan/inf/hex.
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _closest(name: str, choices: Mapping[str, Any]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
