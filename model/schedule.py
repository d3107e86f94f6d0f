"""The training schedule, without torch: stages, kimg budgets, EMA decay, intervals.

Pure arithmetic on :class:`~radsynth.config.TrainConfig`, so the Kubeflow pipeline can ask
for the stage list while compiling (``pipelines/radsynth_pipeline.py``) on a machine
without torch, and the tests can check it in microseconds.

Schedule: stages at ``start_resolution, 2x, ..., final_resolution``. The first stage only
stabilises (``alpha = 1``); every later stage fades in (``alpha`` from 0 to 1 linearly over
its fade kimg) and then stabilises. Progress is counted in real images shown to the critic
(kimg). One *iteration* is ``n_critic`` critic steps and one G step, i.e.
``n_critic * batch`` real images. A non-progressive variant (``dcgan``) trains one stage at
full resolution for the same total kimg, with the batch of the last progressive stage.
"""

from __future__ import annotations

import dataclasses
import math

from radsynth.config import TrainConfig
from radsynth.errors import RadsynthError

# Differentiable augmentations of D's inputs (model.augment); deliberately no flip.
AUGMENT_OPS = ("translation", "cutout", "brightness", "contrast")

# Variants that train stage by stage (model.registry.VARIANTS[...].progressive, without torch).
PROGRESSIVE_VARIANTS = frozenset({"pgcgan-sa"})


class TrainingError(RadsynthError):
    """Training cannot start or continue (schedule, data, checkpoint or divergence)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolution stage of the schedule."""

    resolution: int         # stage resolution R
    batch: int              # global minibatch
    fade_iters: int         # iterations with alpha rising 0 -> 1 (0 for the first stage)
    stabilize_iters: int    # iterations at alpha 1
    images_per_iter: int    # n_critic * batch real images per iteration

    @property
    def total_iters(self) -> int:
        return self.fade_iters + self.stabilize_iters

    def alpha(self, it: int) -> float:
        """Fade-in weight at iteration ``it`` of this stage."""
        return min(1.0, it / self.fade_iters) if self.fade_iters and it < self.fade_iters else 1.0

    @property
    def kimg(self) -> float:
        return self.total_iters * self.images_per_iter / 1000.0


def batch_at(cfg: TrainConfig, res: int) -> int:
    return int(cfg.batch_per_resolution.get(res, cfg.batch_size))


def kimg_at(cfg: TrainConfig, res: int) -> tuple[float, float]:
    """(fade, stabilize) kimg of the stage at ``res``: ``kimg_per_resolution`` or the defaults."""
    if res not in cfg.kimg_per_resolution:
        return float(cfg.kimg_fade), float(cfg.kimg_stabilize)
    pair = cfg.kimg_per_resolution[res]
    if len(pair) != 2 or min(pair) < 0:
        raise TrainingError(f"train.kimg_per_resolution.{res} must be [fade_kimg, stabilize_kimg] (two numbers >= 0), got {list(pair)}")
    return float(pair[0]), float(pair[1])


def is_progressive(variant: str) -> bool:
    return variant in PROGRESSIVE_VARIANTS


def build_schedule(cfg: TrainConfig, img_resolution: int, progressive: bool) -> list[Stage]:
    """The stages of a run (see the module docstring)."""
    res0 = cfg.start_resolution
    if res0 < 4 or res0 & (res0 - 1) or res0 > img_resolution:
        raise TrainingError(f"train.start_resolution must be a power of two in [4, {img_resolution}], got {res0}")
    if cfg.n_critic < 1:
        raise TrainingError(f"train.n_critic must be >= 1, got {cfg.n_critic}")
    check_recipe_values(cfg)

    def iters(kimg: float, batch: int) -> int:
        return int(math.ceil(round(kimg * 1000.0 / (cfg.n_critic * batch), 6))) if kimg > 0 else 0

    resolutions = []
    r = res0
    while r <= img_resolution:
        resolutions.append(r)
        r *= 2
    for r in resolutions:
        if batch_at(cfg, r) < 1:
            raise TrainingError(f"train batch size at {r} must be >= 1")
    if progressive:
        stages = []
        for i, r in enumerate(resolutions):
            b = batch_at(cfg, r)
            fade, stabilize = kimg_at(cfg, r)
            stages.append(Stage(r, b, 0 if i == 0 else iters(fade, b), iters(stabilize, b), cfg.n_critic * b))
        if stages[0].total_iters == 0:
            raise TrainingError(f"train.kimg_stabilize (or train.kimg_per_resolution.{res0}) must be > 0 for the first stage")
        return stages
    # One full-resolution stage with the same real-image budget as the progressive schedule.
    budgets = [kimg_at(cfg, r) for r in resolutions]                 # [(fade, stabilize)] per resolution
    total_kimg = sum(stabilize + (fade if i else 0.0) for i, (fade, stabilize) in enumerate(budgets))
    b = batch_at(cfg, img_resolution)
    n = iters(total_kimg, b)
    if n == 0:
        raise TrainingError("train.kimg_fade + train.kimg_stabilize must give > 0 kimg")
    return [Stage(img_resolution, b, 0, n, cfg.n_critic * b)]


def stage_resolutions(cfg: TrainConfig, img_resolution: int, variant: str) -> list[int]:
    """Resolutions of a run's stages, lowest first (one Kubeflow training task each)."""
    final = cfg.final_resolution or img_resolution
    return [st.resolution for st in build_schedule(cfg, final, is_progressive(variant))]


def check_recipe_values(cfg: TrainConfig) -> None:
    """Range checks of the optimiser / regulariser / augmentation options (clear errors)."""
    if cfg.class_ce < 0 or cfg.mode_seeking < 0:
        raise TrainingError(f"train.class_ce and train.mode_seeking must be >= 0 (0: off), got {cfg.class_ce}, {cfg.mode_seeking}")
    if cfg.gp_interval < 1:
        raise TrainingError(f"train.gp_interval must be >= 1 (1: penalty on every critic step), got {cfg.gp_interval}")
    if cfg.ema_kimg < 0 or cfg.ema_rampup < 0:
        raise TrainingError(f"train.ema_kimg and train.ema_rampup must be >= 0, got {cfg.ema_kimg}, {cfg.ema_rampup}")
    if cfg.lr_rampdown_kimg < 0 or not 0.0 <= cfg.lr_rampdown_floor <= 1.0:
        raise TrainingError(f"train.lr_rampdown_kimg must be >= 0 and train.lr_rampdown_floor in [0, 1], "
                            f"got {cfg.lr_rampdown_kimg}, {cfg.lr_rampdown_floor}")
    if any(h < 0 for h in cfg.ema_probes) or len(set(cfg.ema_probes)) != len(cfg.ema_probes):
        raise TrainingError(f"train.ema_probes must be distinct half-lives >= 0 (kimg), got {list(cfg.ema_probes)}")
    if not (0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0):
        raise TrainingError(f"train.beta1/beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    unknown = [op for op in cfg.augment if op not in AUGMENT_OPS]
    if unknown:
        raise TrainingError(f"train.augment: unknown op(s) {unknown}; known: {', '.join(AUGMENT_OPS)} "
                            f"(no flips: a chest film is not left-right symmetric)")
    if not 0.0 <= cfg.augment_p <= 1.0 or not 0.0 <= cfg.augment_target <= 1.0:
        raise TrainingError(f"train.augment_p and train.augment_target must be in [0, 1], got {cfg.augment_p}, {cfg.augment_target}")
    if cfg.augment_target > 0 and cfg.augment_kimg <= 0:
        raise TrainingError("train.augment_kimg must be > 0 when train.augment_target (adaptive augmentation) is on")


def ema_beta(cfg: TrainConfig, images_per_iter: int, kimg_done: float) -> float:
    """Per-G-step EMA decay for a half-life of ``ema_kimg`` kimg of progress, with ramp-up.

    ``beta = 0.5 ** (images_per_iter / ema_nimg)`` with
    ``ema_nimg = min(ema_kimg * 1000, kimg_done * 1000 * ema_rampup)`` when ``ema_rampup > 0``
    (StyleGAN2-ADA), so the average forgets its random start early in a short run. The
    half-life counts real images shown to the critic, the same unit as the schedule, so it
    does not change meaning with ``n_critic`` or the batch. ``ema_kimg = 0``: no averaging.
    """
    if cfg.ema_kimg <= 0:
        return 0.0
    nimg = cfg.ema_kimg * 1000.0
    if cfg.ema_rampup > 0:
        nimg = min(nimg, kimg_done * 1000.0 * cfg.ema_rampup)
    if nimg <= 0:
        return 0.0
    return 0.5 ** (images_per_iter / nimg)


def lr_scale(cfg: TrainConfig, kimg_done: float, total_kimg: float) -> float:
    """Learning-rate factor at ``kimg_done`` of a ``total_kimg`` schedule: 1, then over the last
    ``lr_rampdown_kimg`` a half cosine down to ``lr_rampdown_floor`` at the end (0: no ramp-down).
    The last iterate of a short high-lr run is a random point of its oscillation; lowering the
    step at the end settles it, which a short G_ema half-life alone does not."""
    if cfg.lr_rampdown_kimg <= 0:
        return 1.0
    start = total_kimg - cfg.lr_rampdown_kimg
    t = min(max((kimg_done - start) / cfg.lr_rampdown_kimg, 0.0), 1.0)
    return cfg.lr_rampdown_floor + (1.0 - cfg.lr_rampdown_floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def every(interval_kimg: float, images_per_iter: int) -> int:
    """Iterations between two events ``interval_kimg`` apart (at least 1)."""
    return max(1, round(interval_kimg * 1000 / images_per_iter))
