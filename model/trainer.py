"""Progressive WGAN-GP training loop: stages, fade-in, EMA, checkpoints, resume, DDP, tracking.

Schedule (``train:`` in params): stages at ``start_resolution, 2x, ..., final_resolution``.
The first stage only stabilises (``alpha = 1``); every later stage fades in
(``alpha`` from 0 to 1 linearly over ``kimg_fade``) and then stabilises (``kimg_stabilize``).
Progress is counted in real images shown to the critic (kimg). One *iteration* is
``n_critic`` critic steps and one G step, i.e. ``n_critic * batch`` real images. A
non-progressive variant (``dcgan``) trains one stage at full resolution for the same total
kimg, with the same batch as the last progressive stage.

During a fade-in the real images are faded too (PG-GAN):
``real = lerp(upsample(x_{R/2}), x_R, alpha)``, so real and fake go through the same blend.

Checkpoints go to ``<out>/stage_<R>/checkpoint.json`` (+ a safetensors file): weights of
G, D and G_ema, both Adam states, the RNG state of every rank, the iteration, and the metric
history. They are written every ``checkpoint_kimg`` and at the end of the stage (then marked
``complete``). All randomness comes from one seeded ``torch.Generator`` per rank, so a run
that is killed and resumed from its last checkpoint performs exactly the same operations as
an uninterrupted one (bitwise-equal weights on CPU).

DDP (``torchrun``): ranks start from the same weights, each draws its own batch
(``batch / world_size`` images, own RNG stream), and gradients are averaged with one
``all_reduce`` per step (the gradient penalty's double backward rules out DDP's reducer
hooks). Rank 0 writes checkpoints, grids, logs and MLflow.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import CheckpointError, load_state, model_config_to_dict, save_generator, save_state, state_exists
from model.layers import upsample2x
from model.losses import critic_loss, generator_loss
from model.registry import build_networks, get_variant
from model.sampling import class_grid, save_grid_png
from radsynth.config import Params, TrainConfig
from radsynth.dataset import Dataset
from radsynth.errors import RadsynthError
from radsynth.tracking import data_version

# Training metric names (MLflow keys and history columns).
LOSS_D = "train/loss_D"
LOSS_G = "train/loss_G"
WASSERSTEIN = "train/wasserstein"
GRADIENT_PENALTY = "train/gradient_penalty"
DRIFT = "train/drift"
IMAGES_PER_S = "train/images_per_s"
ALPHA = "train/alpha"
RESOLUTION = "train/resolution"
KIMG = "kimg"

# Train keys that do not change the arithmetic (excluded from the resume compatibility check).
_NON_MATH_KEYS = {"device", "threads", "checkpoint_kimg", "log_kimg", "grid_per_class", "grid_seed", "tracking", "progress"}


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


def build_schedule(cfg: TrainConfig, img_resolution: int, progressive: bool) -> list[Stage]:
    """The stages of a run (see module docstring)."""
    res0 = cfg.start_resolution
    if res0 < 4 or res0 & (res0 - 1) or res0 > img_resolution:
        raise TrainingError(f"train.start_resolution must be a power of two in [4, {img_resolution}], got {res0}")
    if cfg.n_critic < 1:
        raise TrainingError(f"train.n_critic must be >= 1, got {cfg.n_critic}")

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


def config_digest(params: Params, classes: list[str]) -> str:
    """Hash of everything that changes the arithmetic of training (for resume checks)."""
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in _NON_MATH_KEYS}
    blob = json.dumps({"seed": params.seed, "model": dataclasses.asdict(params.model), "train": train, "classes": classes},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_dir(out_dir: Path, res: int) -> Path:
    return out_dir / f"stage_{res}"


def checkpoint_path(out_dir: Path, res: int) -> Path:
    return stage_dir(out_dir, res) / "checkpoint.json"


# --------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def _allreduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def params_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Tracking (rank 0 only; a no-op when disabled)
# --------------------------------------------------------------------------------------


class _Tracker:
    def __init__(self, params: Params, enabled: bool):
        self.params = params
        self.enabled = enabled
        self.run_id: str | None = None

    def start(self, run_id: str | None, tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        from radsynth.tracking import provenance, setup_mlflow

        setup_mlflow(self.params)
        run = None
        if run_id:
            try:
                run = mlflow.start_run(run_id=run_id)
            except Exception:  # run from another tracking store: start a fresh one
                run = None
        if run is None:
            run = mlflow.start_run(run_name=f"train-{self.params.model.variant}")
            mlflow.log_params(_flatten(self.params.to_dict()))
        mlflow.set_tags({**provenance(self.params), **tags})
        self.run_id = run.info.run_id
        return self.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in values.items() if k != KIMG and math.isfinite(v)}, step=step)

    def artifact(self, path: Path, folder: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


class Trainer:
    """Holds G, D, G_ema, optimisers, data and RNG; trains stage by stage.

    Use :func:`train_networks`; the class is public for tests and tools.
    """

    def __init__(self, params: Params, dataset: Dataset, out_dir: Path, on_iteration: Callable[["Trainer"], None] | None = None):
        self.params, self.cfg = params, params.train
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.classes = dataset.classes
        self.on_iteration = on_iteration
        self.device = resolve_device(self.cfg.device)
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        self.dist = setup_distributed(self.device)
        self.amp = bool(self.cfg.amp and self.device.type == "cuda")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.variant = get_variant(params.model.variant)
        self.img_resolution = self.cfg.final_resolution or dataset.img_resolution
        self.img_channels = dataset.img_channels
        self.schedule = build_schedule(self.cfg, self.img_resolution, self.variant.progressive)
        for st in self.schedule:
            if st.batch % self.dist.world:
                raise TrainingError(f"batch {st.batch} at {st.resolution} is not divisible by the {self.dist.world} DDP ranks")
        self.digest = config_digest(params, self.classes)
        self._load_data()

        self.G, self.D = build_networks(params.model, dataset.num_classes, self.img_channels, self.img_resolution, seed=params.seed)
        self.G.to(self.device)
        self.D.to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=self.cfg.lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=self.cfg.lr_d, betas=betas)
        self.gen = torch.Generator().manual_seed(params.seed * 1000 + self.dist.rank)
        self.stage_index = 0
        self.it = 0                     # iterations done in the current stage
        self.g_steps = 0                # total G steps (EMA warm-up)
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None
        self.position: tuple[int, int] | None = None   # (stage index, it) the in-memory state is at
        self.tracker = _Tracker(params, self.cfg.tracking and self.dist.main)
        self._acc = torch.zeros(5, device=self.device)
        self._acc_n = 0

    # ---- data -----------------------------------------------------------------------
    def _load_data(self) -> None:
        needed = {st.resolution for st in self.schedule}
        needed |= {st.resolution // 2 for st in self.schedule if st.fade_iters}
        missing = sorted(r for r in needed if r not in self.dataset.levels)
        if missing:
            raise TrainingError(f"dataset {self.dataset.root} lacks levels {missing} (has {self.dataset.levels}); "
                                f"re-run preprocess with data.min_resolution <= {min(needed)} and img_resolution >= {max(needed)}")
        labels = self.dataset.split_labels("train")
        if len(labels) == 0:
            raise TrainingError(f"dataset {self.dataset.root} has no 'train' images")
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(self.device)   # [N] int64
        self.reals = {r: torch.from_numpy(np.ascontiguousarray(self.dataset.images(r, split="train"))).to(self.device)
                      for r in sorted(needed)}                                          # {R: uint8 [N, C, R, R]}
        self.num_train = int(self.labels.shape[0])
        # Class-balanced draws: indices sorted by class, each class's [start, start + count) slice.
        counts = torch.bincount(self.labels.cpu(), minlength=self.dataset.num_classes)
        self._by_class = torch.argsort(self.labels.cpu(), stable=True)                   # [N]
        self._class_start = torch.cumsum(counts, 0) - counts                             # [K]
        self._class_count = counts                                                       # [K]
        self._present = torch.nonzero(counts).flatten()                                  # classes with images

    def _real_batch(self, idx: torch.Tensor, stage: Stage, alpha: float) -> torch.Tensor:
        """Real images [n, C, R, R] in [-1, 1] (``radsynth.dataset.to_float`` arithmetic)."""
        x = self.reals[stage.resolution][idx].float() / 127.5 - 1.0
        if alpha < 1.0:
            low = self.reals[stage.resolution // 2][idx].float() / 127.5 - 1.0
            x = torch.lerp(upsample2x(low), x, alpha)
        return x

    # ---- one iteration ----------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp)

    def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cfg.balanced_classes:
            k = self._present[torch.randint(len(self._present), (n,), generator=self.gen)]   # [n] uniform classes
            offset = (torch.rand(n, generator=self.gen) * self._class_count[k]).long()
            idx = self._by_class[self._class_start[k] + offset]
        else:
            idx = torch.randint(self.num_train, (n,), generator=self.gen)
        z = torch.randn(n, self.G.z_dim, generator=self.gen)
        u = torch.rand(n, 1, 1, 1, generator=self.gen)
        return idx.to(self.device), z.to(self.device), u.to(self.device)

    def _iteration(self, stage: Stage, alpha: float) -> None:
        cfg, n = self.cfg, stage.batch // self.dist.world
        for net in (self.G, self.D, self.G_ema):
            net.set_stage(stage.resolution, alpha)
        # critic steps
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        for _ in range(cfg.n_critic):
            idx, z, u = self._draw(n)
            c = self.labels[idx]
            real = self._real_batch(idx, stage, alpha)                              # [n, C, R, R]
            with torch.no_grad(), self._autocast():
                fake = self.G(z, c).float()                                          # [n, C, R, R]
            with self._autocast():
                loss_d, stats = critic_loss(self.D, real, fake, c, u, cfg.gp_lambda, cfg.drift_epsilon)
            self.opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            _allreduce_mean([p.grad for p in self.D.parameters() if p.grad is not None], self.dist.world)
            self.opt_D.step()
        # generator step (classes drawn like the critic's: data frequency, or uniform when balanced)
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        idx, z, _ = self._draw(n)
        c = self.labels[idx]
        with self._autocast():
            loss_g = generator_loss(self.D, self.G(z, c), c)
        self.opt_G.zero_grad(set_to_none=True)
        loss_g.backward()
        _allreduce_mean([p.grad for p in self.G.parameters() if p.grad is not None], self.dist.world)
        self.opt_G.step()
        _allreduce_mean([b for b in self.G.buffers() if b.is_floating_point()], self.dist.world)
        self._update_ema()
        self._acc += torch.stack([loss_d.detach().float(), loss_g.detach().float(), stats["wasserstein"], stats["gp"], stats["drift"]])
        self._acc_n += 1

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.g_steps += 1
        beta = min(self.cfg.ema_beta, (1.0 + self.g_steps) / (10.0 + self.g_steps))  # warm-up for short runs
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # ---- state ------------------------------------------------------------------------
    def _gather_rng(self) -> list[torch.Tensor]:
        state = self.gen.get_state()
        if self.dist.world <= 1:
            return [state]
        out = [torch.empty_like(state) for _ in range(self.dist.world)]
        dist.all_gather(out, state)
        return out

    def state(self) -> dict[str, Any]:
        return {
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "rng": self._gather_rng(),
        }

    def info(self, complete: bool) -> dict[str, Any]:
        st = self.schedule[self.stage_index]
        return {
            "config_digest": self.digest, "variant": self.params.model.variant, "classes": self.classes,
            "resolution": st.resolution, "stage_index": self.stage_index, "iteration": self.it,
            "stage_iters": st.total_iters, "complete": complete, "g_steps": self.g_steps,
            "kimg": self.kimg, "world_size": self.dist.world,
            "mlflow_run_id": self.run_id, "history": self.history, "data_root": str(self.dataset.root),
            "data_md5": self.dataset.meta.get("data_md5"), "params": self.params.to_dict(),
        }

    @property
    def kimg(self) -> float:
        """Real images shown to the critic so far, in thousands (all stages)."""
        done = sum(s.kimg for s in self.schedule[:self.stage_index])
        return done + self.it * self.schedule[self.stage_index].images_per_iter / 1000.0

    def save(self, complete: bool) -> None:
        state = self.state()    # collective under DDP: every rank takes part
        if self.dist.main:
            save_state(checkpoint_path(self.out_dir, self.schedule[self.stage_index].resolution), state, self.info(complete))
        self.dist.barrier()

    def load(self, path: Path) -> dict[str, Any]:
        try:
            state, info = load_state(path)
        except CheckpointError as exc:
            raise TrainingError(f"cannot resume: {exc}") from None
        if info.get("config_digest") != self.digest:
            raise TrainingError(f"{path} was written with a different model/train config, seed or class list; "
                                f"train into a fresh out_dir or pass resume=False (--no-resume) for this stage")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        rng = state["rng"]
        self.gen.set_state(rng[self.dist.rank % len(rng)])
        self.stage_index, self.it, self.g_steps = info["stage_index"], info["iteration"], info["g_steps"]
        self.history, self.run_id = list(info["history"]), info.get("mlflow_run_id")
        self.position = (self.stage_index, self.it)
        return info

    # ---- stages -----------------------------------------------------------------------
    def _prepare_stage(self, index: int, resume: bool) -> bool:
        """Bring the state to the start (or resume point) of stage ``index``.

        Order: the stage's own checkpoint (``resume``), else the in-memory state when it is
        the finished previous stage, else the previous stage's finished checkpoint, else
        (first stage) the freshly initialised networks.

        Returns:
            True when the stage is already complete.
        """
        st = self.schedule[index]
        own = checkpoint_path(self.out_dir, st.resolution)
        if resume and state_exists(own):
            info = self.load(own)
            if info["stage_index"] != index:
                raise TrainingError(f"{own} belongs to stage index {info['stage_index']}, expected {index}")
            return self.it >= st.total_iters
        if index > 0:
            prev = self.schedule[index - 1]
            if self.position != (index - 1, prev.total_iters):
                path = checkpoint_path(self.out_dir, prev.resolution)
                if not state_exists(path):
                    raise TrainingError(f"stage {st.resolution} needs the finished stage {prev.resolution} in {path.parent}; "
                                        f"run `radsynth train --stage {prev.resolution}` first")
                info = self.load(path)
                if not info["complete"]:
                    raise TrainingError(f"stage {prev.resolution} in {path.parent} is not finished; resume it with --stage {prev.resolution}")
        self.stage_index, self.it = index, 0
        self.position = (index, 0)
        return False

    def _log(self, st: Stage, alpha: float, seconds: float, images: int, bar) -> None:
        acc = (self._acc / max(self._acc_n, 1)).tolist()   # rank 0's running means (gradients are averaged)
        row = {KIMG: round(self.kimg, 4), LOSS_D: acc[0], LOSS_G: acc[1], WASSERSTEIN: acc[2], GRADIENT_PENALTY: acc[3], DRIFT: acc[4],
               IMAGES_PER_S: images / max(seconds, 1e-9), ALPHA: alpha, RESOLUTION: float(st.resolution)}
        self._acc.zero_()
        self._acc_n = 0
        if not all(math.isfinite(row[k]) for k in (LOSS_D, LOSS_G)):
            raise TrainingError(f"training diverged at {self.kimg:.1f} kimg (loss is {row[LOSS_D]}); lower train.lr_d/lr_g or raise gp_lambda")
        self.history.append(row)
        if self.dist.main:
            self.tracker.metrics(row, step=int(round(self.kimg * 1000)))
            if bar is not None:
                bar.set_postfix_str(f"res {st.resolution} a {alpha:.2f} D {acc[0]:+.3f} G {acc[1]:+.3f} W {acc[2]:+.3f} gp {acc[3]:.3f}")

    def train_stage(self, index: int, bar=None) -> None:
        st = self.schedule[index]
        cfg = self.cfg
        log_every = max(1, round(cfg.log_kimg * 1000 / st.images_per_iter))
        ckpt_every = max(1, round(cfg.checkpoint_kimg * 1000 / st.images_per_iter))
        self.G.train()
        self.D.train()
        t0, imgs = time.perf_counter(), 0
        while self.it < st.total_iters:
            alpha = st.alpha(self.it)
            self._iteration(st, alpha)
            self.it += 1
            self.position = (index, self.it)
            imgs += st.images_per_iter
            if bar is not None:
                bar.update(st.images_per_iter / 1000.0)
            done = self.it == st.total_iters
            if self.it % log_every == 0 or done:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self._log(st, alpha, time.perf_counter() - t0, imgs, bar)
                t0, imgs = time.perf_counter(), 0
            if self.it % ckpt_every == 0 or done:
                self.save(complete=done)
            if self.on_iteration is not None:
                self.on_iteration(self)

    def stage_outputs(self, index: int) -> dict[str, Any]:
        """Grid of G_ema per condition at fixed z (rank 0), logged to MLflow."""
        st = self.schedule[index]
        out: dict[str, Any] = {"resolution": st.resolution, "kimg": round(self.kimg, 3)}
        if not self.dist.main:
            return out
        self.G_ema.set_stage(st.resolution, 1.0)
        grid = class_grid(self.G_ema, len(self.classes), self.cfg.grid_per_class, self.cfg.grid_seed)
        path = save_grid_png(stage_dir(self.out_dir, st.resolution) / f"grid_{st.resolution}.png", grid, self.classes)
        self.tracker.artifact(path, "grids")
        out["grid"] = str(path)
        return out


def plot_curves(history: list[dict[str, float]], path: Path) -> Path | None:
    """Training curves (losses, Wasserstein estimate, gradient penalty vs kimg) as PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radsynth.io import atomic_path

    kimg = [h[KIMG] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax_i in ((LOSS_D, 0), (LOSS_G, 0), (WASSERSTEIN, 1), (GRADIENT_PENALTY, 2)):
        axes[ax_i].plot(kimg, [h[key] for h in history], label=key.split("/")[-1])
    changes = [history[i][KIMG] for i in range(1, len(history)) if history[i][RESOLUTION] != history[i - 1][RESOLUTION]]
    for ax, title in zip(axes, ("losses", "Wasserstein estimate", "gradient penalty")):
        for x in changes:
            ax.axvline(x, color="grey", lw=0.6, ls=":")
        ax.set_title(title)
        ax.set_xlabel("kimg")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def train_networks(
    params: Params,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    stage: int | None = None,
    resume: bool = True,
    on_iteration: Callable[[Trainer], None] | None = None,
) -> dict[str, Any]:
    """Run the whole schedule (``stage=None``) or one stage; see the module docstring.

    Returns:
        A JSON-able summary: stages run, kimg, last metrics, paths, per-rank weight digests.
    """
    out_dir = Path(out_dir)
    trainer = Trainer(params, dataset, out_dir, on_iteration=on_iteration)
    schedule = trainer.schedule
    resolutions = [st.resolution for st in schedule]
    if stage is not None and stage not in resolutions:
        raise TrainingError(f"--stage {stage} is not in this run's schedule {resolutions} (variant {params.model.variant})")
    indices = list(range(len(schedule))) if stage is None else [resolutions.index(stage)]

    from tqdm import tqdm

    total_kimg = sum(schedule[i].kimg for i in indices)
    bar = tqdm(total=round(total_kimg, 3), unit="kimg", desc="train", disable=not (params.train.progress and trainer.dist.main),
               bar_format="{desc} {n:.1f}/{total:.1f} kimg |{bar}| {elapsed}<{remaining} {postfix}")
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"variant": params.model.variant, "schedule": [dataclasses.asdict(s) for s in schedule], "stages": []}
    status = "FAILED"
    try:
        for index in indices:
            st = schedule[index]
            bar.set_description(f"train {st.resolution}x{st.resolution}")
            already = trainer._prepare_stage(index, resume=resume)
            if trainer.tracker.enabled and trainer.tracker.run_id is None:
                trainer.run_id = trainer.tracker.start(trainer.run_id, {"variant": params.model.variant})
            if already:
                bar.update(st.kimg)
                summary["stages"].append({"resolution": st.resolution, "skipped": "already complete"})
                continue
            bar.update(trainer.it * st.images_per_iter / 1000.0)
            trainer.train_stage(index, bar)
            summary["stages"].append(trainer.stage_outputs(index))
        last_index = len(schedule) - 1
        final_done = trainer.position == (last_index, schedule[last_index].total_iters)
        if final_done and trainer.dist.main:
            meta = {"classes": trainer.classes, "data_md5": str(dataset.meta.get("data_md5") or data_version()),
                    "params_digest": params.digest(), "kimg": round(trainer.kimg, 3), "config_digest": trainer.digest,
                    "seed": params.seed, "train_run_id": trainer.run_id}
            summary["G_ema"] = str(save_generator(out_dir / "G_ema.safetensors", trainer.G_ema, meta))
        curves = plot_curves(trainer.history, out_dir / "curves.png") if trainer.dist.main else None
        if curves is not None:
            trainer.tracker.artifact(curves, "plots")
        digest = params_sha256(trainer.G_ema)
        if trainer.dist.world > 1:
            gathered: list[Any] = [None] * trainer.dist.world
            dist.all_gather_object(gathered, digest)
            summary["rank_G_ema_sha256"] = gathered
        else:
            summary["rank_G_ema_sha256"] = [digest]
        summary.update(kimg=round(trainer.kimg, 3), complete=final_done, seconds=round(time.perf_counter() - t_start, 2),
                       last=trainer.history[-1] if trainer.history else {}, mlflow_run_id=trainer.run_id,
                       world_size=trainer.dist.world, device=str(trainer.device), amp=trainer.amp)
        status = "FINISHED"
        return summary
    finally:
        bar.close()
        trainer.tracker.end(status)
        if trainer.dist.owns_group:
            dist.destroy_process_group()
