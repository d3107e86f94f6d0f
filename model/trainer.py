"""Progressive WGAN-GP training loop: stages, fade-in, augmentation, EMA, checkpoints, resume.

The schedule (stages, kimg, EMA decay) is :mod:`model.schedule` (no torch); devices, threads
and DDP collectives are :mod:`model.distributed`; MLflow is
:class:`radsynth.tracking.TrainingTracker`. This module holds the loop.

One iteration: ``n_critic`` critic steps, then one G step. Each critic step draws a batch
of real images and class labels (at data frequency, or uniformly over classes with
``balanced_classes``), the same classes for the fakes, and minimises the WGAN-GP loss
(:mod:`model.losses`; the penalty on every ``gp_interval``-th critic step only, weighted by
the interval). G minimises ``-D(G(z, c), c)``, plus ``mode_seeking`` x MSGAN's term when set.
With ``class_ce`` both add the class cross-entropy of the projection logits (D on reals, G on fakes).
D sees real and fake images through the same differentiable augmentation
(:mod:`model.augment`, probability ``augment_p`` or adaptive towards ``augment_target``).
After the G step, ``G_ema`` moves towards G with a half-life of ``ema_kimg``. Each half-life in
``ema_probes`` keeps one more such average on rank 0 (checkpointed, saved beside G_ema under
``ema_probes/``): the averages never feed back into training, so one run shows what every
half-life would have given.

During a fade-in the real images are faded too (PG-GAN):
``real = lerp(upsample(x_{R/2}), x_R, alpha)``, in [-1, 1] image space, the same blend G
applies after its output map (``model.fade_after_output``). ``reset_optimizers`` starts each
new resolution with fresh Adam moments (the new layers' gradients have other scales).

Checkpoints go to ``<out>/stage_<R>/checkpoint.json`` (+ a safetensors file): weights of
G, D and G_ema, both Adam states, the RNG state of every rank, the adaptive augmentation
state, the iteration, and the metric history. They are written every ``checkpoint_kimg``
and at the end of the stage (then marked ``complete``). All randomness comes from one
seeded ``torch.Generator`` per rank on the rank's device, so a run that is killed and
resumed from its last checkpoint performs exactly the same operations as an uninterrupted
one (bitwise-equal weights on CPU with a fixed ``train.threads``).

While it runs, rank 0 logs metrics every ``log_kimg`` (MLflow and ``<out>/history.tsv``,
which ``dvc plots`` draws against kimg) and fixed-z grids per condition every
``grid_kimg`` (``stage_<R>/progress/``, MLflow ``grids/progress``).

DDP (``torchrun``): ranks start from the same weights, each draws its own batch share
(``batch / world_size`` images, own RNG stream), and gradients are averaged with one
``all_reduce`` per step. Rank 0 writes checkpoints, grids, logs and MLflow.
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

from model.augment import AdaptiveP, augment
from model.checkpoint import CheckpointError, load_state, save_generator, save_state, state_exists
from model.distributed import (
    CpuThreads,
    all_finite,
    allreduce_mean,
    allreduce_sum,
    gather_rng_states,
    params_sha256,
    resolve_device,
    setup_distributed,
)
from model.layers import upsample2x
from model.losses import (LossStats, critic_loss, generator_class_losses, generator_loss, generator_total,
                          mode_seeking_loss)
from model.registry import build_networks, get_variant
from model.sampling import class_grid
from model.schedule import Stage, TrainingError, build_schedule, ema_beta, every, lr_scale
from radsynth.config import Params
from radsynth.dataset import Dataset
from radsynth.grid import save_grid_png
from radsynth.tracking import TrainingTracker, data_version

__all__ = ["Stage", "Trainer", "TrainingError", "build_schedule", "train_networks"]

# Training metric names (MLflow keys and history columns).
LOSS_D = "train/loss_D"
LOSS_G = "train/loss_G"
WASSERSTEIN = "train/wasserstein"
GRADIENT_PENALTY = "train/gradient_penalty"
DRIFT = "train/drift"
MODE_SEEKING = "train/mode_seeking"   # MSGAN's term before its weight (NaN when train.mode_seeking is 0)
CLASS_CE_REAL = "train/class_ce_real"  # D's class cross-entropy on reals, before its weight (NaN when train.class_ce is 0)
CLASS_CE_FAKE = "train/class_ce_fake"  # G's on its fakes
CLASS_CE_TWIN = "train/class_ce_twin"  # D's twin head on fakes (model.d_twin_classifier; G pushes it up)
AUGMENT_P = "train/augment_p"
LR_SCALE = "train/lr_scale"          # factor on lr_g and lr_d (train.lr_rampdown_kimg)
IMAGES_PER_S = "train/images_per_s"
THREADS = "train/threads"
ALPHA = "train/alpha"
RESOLUTION = "train/resolution"
KIMG = "kimg"
HISTORY_COLUMNS = (KIMG, RESOLUTION, ALPHA, LOSS_D, LOSS_G, WASSERSTEIN, GRADIENT_PENALTY, DRIFT, MODE_SEEKING, CLASS_CE_REAL,
                   CLASS_CE_FAKE, CLASS_CE_TWIN, AUGMENT_P, LR_SCALE, IMAGES_PER_S, THREADS)
HISTORY_TSV = "history.tsv"

# Train keys that do not change the arithmetic (excluded from the resume compatibility check).
_NON_MATH_KEYS = {"recipe", "device", "threads", "checkpoint_kimg", "log_kimg", "grid_kimg", "grid_per_class", "grid_seed",
                  "tracking", "tracking_retries", "progress", "ema_probes"}
EMA_PROBES_DIR = "ema_probes"


def arithmetic(resolved: dict[str, Any], ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What in a resolved config (``Params.to_dict()``, e.g. a run's saved params.yaml) changes
    the arithmetic of training: ``seed``, ``model`` and ``train`` without the non-math keys
    (and without the train keys in ``ignore``). Two runs with equal results trained alike."""
    skip = _NON_MATH_KEYS | set(ignore)
    return {"seed": resolved.get("seed"), "model": resolved.get("model"),
            "train": {k: v for k, v in (resolved.get("train") or {}).items() if k not in skip}}


def changed_keys(now: dict[str, Any], then: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """The keys (``seed``, ``model.*``, ``train.*``) in whose arithmetic two resolved configs
    differ. A key ``then`` lacks (added to the code after it was written) counts at its
    default, which is what that run was trained with."""
    from radsynth.config import Params

    def plain(resolved: dict[str, Any]) -> dict[str, Any]:   # as JSON has it (a checkpoint's sidecar): str keys, lists
        return json.loads(json.dumps(arithmetic(resolved, ignore), sort_keys=True, default=str))

    a, b, default = plain(now), plain(then), plain(Params().to_dict())
    keys = [k for k in ("seed",) if a[k] != b[k]]
    for section in ("model", "train"):
        keys += [f"{section}.{k}" for k in sorted(set(a[section] or {}) | set(b[section] or {}))
                 if (a[section] or {}).get(k) != (b[section] or {}).get(k, default[section].get(k))]
    return keys


def ema_probe_path(out_dir: Path, half_life_kimg: float) -> Path:
    """Where the G average with half-life ``half_life_kimg`` (``train.ema_probes``) is saved."""
    return Path(out_dir) / EMA_PROBES_DIR / f"G_ema_h{half_life_kimg:g}.safetensors"


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
        self.threads = CpuThreads(self.cfg.threads)
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads.initial())
        self.dist = setup_distributed(self.device)
        self.amp = bool(self.cfg.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.variant = get_variant(params.model.variant)
        self.img_resolution = self.cfg.final_resolution or dataset.img_resolution
        self.img_channels = dataset.img_channels
        self.schedule = build_schedule(self.cfg, self.img_resolution, self.variant.progressive)
        for st in self.schedule:
            if st.batch % self.dist.world:
                raise TrainingError(f"batch {st.batch} at {st.resolution} is not divisible by the {self.dist.world} DDP ranks")
        self.total_kimg = sum(st.kimg for st in self.schedule)
        self.digest = config_digest(params, self.classes)
        self._load_data()

        self.G, self.D = build_networks(params.model, dataset.num_classes, self.img_channels, self.img_resolution, seed=params.seed)
        if self.cfg.class_ce > 0 and getattr(self.D, "embed", None) is None:
            raise TrainingError("train.class_ce needs a projection critic: pgcgan-sa, or dcgan with "
                                "model.dcgan_conditioning: projection (or set train.class_ce: 0)")
        self.twin = getattr(self.D, "embed_twin", None) is not None
        if self.twin and self.cfg.class_ce <= 0:
            raise TrainingError("model.d_twin_classifier trains its head with the class cross-entropy: "
                                "set train.class_ce > 0 (or model.d_twin_classifier: false)")
        if not 0.0 <= self.cfg.class_ce_twin_g <= 1.0:
            raise TrainingError(f"train.class_ce_twin_g is the share of G's twin term, from 0 (AC-GAN) to 1 (TAC-GAN); "
                                f"got {self.cfg.class_ce_twin_g}")
        self.G.to(self.device)
        self.D.to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.ema_probes = {h: (dataclasses.replace(self.cfg, ema_kimg=h), copy.deepcopy(self.G_ema))
                           for h in self.cfg.ema_probes} if self.dist.main else {}
        self._make_optimizers()
        self.gen = torch.Generator(device=self.device).manual_seed(params.seed * 1000 + self.dist.rank)
        self.ada = AdaptiveP(self.cfg.augment_p, self.cfg.augment_target, self.cfg.augment_kimg, self.device) \
            if self.cfg.augment and self.cfg.augment_target > 0 else None
        self.stage_index = 0
        self.it = 0                     # iterations done in the current stage
        self.g_steps = 0                # total G steps
        self.history: list[dict[str, float]] = []
        self.run_id: str | None = None
        self.position: tuple[int, int] | None = None   # (stage index, it) the in-memory state is at
        self.tracker = TrainingTracker(params, self.cfg.tracking and self.dist.main, retries=self.cfg.tracking_retries)
        self.stats = LossStats()

    def _make_optimizers(self) -> None:
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=self.cfg.lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=self.cfg.lr_d, betas=betas)

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
        counts = torch.bincount(self.labels, minlength=self.dataset.num_classes)       # [K]
        self._by_class = torch.argsort(self.labels, stable=True)                        # [N]
        self._class_start = torch.cumsum(counts, 0) - counts                             # [K]
        self._class_count = counts                                                       # [K]
        self._present = torch.nonzero(counts.cpu()).flatten().to(self.device)            # classes with images

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
        """Indices, z and penalty weights, drawn on the device (no host-device sync)."""
        g, dev = self.gen, self.device
        if self.cfg.balanced_classes:
            k = self._present[torch.randint(len(self._present), (n,), generator=g, device=dev)]   # [n] uniform classes
            offset = (torch.rand(n, generator=g, device=dev) * self._class_count[k]).long()
            idx = self._by_class[self._class_start[k] + offset]
        else:
            idx = torch.randint(self.num_train, (n,), generator=g, device=dev)
        z = torch.randn(n, self.G.z_dim, generator=g, device=dev)
        u = torch.rand(n, 1, 1, 1, generator=g, device=dev)
        return idx, z, u

    @property
    def augment_p(self) -> float | torch.Tensor:
        return self.ada.p if self.ada is not None else self.cfg.augment_p

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return augment(x, self.cfg.augment, self.augment_p, self.gen) if self.cfg.augment else x

    def gp_weight(self, critic_step: int) -> float:
        """Penalty weight of critic step ``critic_step`` of the stage (lazy: k * lambda every k-th)."""
        k = self.cfg.gp_interval
        return self.cfg.gp_lambda * k if critic_step % k == 0 else 0.0

    def _iteration(self, stage: Stage, alpha: float) -> None:
        cfg, n = self.cfg, stage.batch // self.dist.world
        for net in (self.G, self.D, self.G_ema):
            net.set_stage(stage.resolution, alpha)
        self._set_lr()
        # critic steps
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        for j in range(cfg.n_critic):
            idx, z, u = self._draw(n)
            c = self.labels[idx]
            real = self._real_batch(idx, stage, alpha)                              # [n, C, R, R]
            with torch.no_grad(), self._autocast():
                fake = self.G(z, c).float()                                          # [n, C, R, R]
            with self._autocast():
                loss_d, parts = critic_loss(self.D, self._augment(real), self._augment(fake), c, u,
                                            self.gp_weight(self.it * cfg.n_critic + j), cfg.drift_epsilon, cfg.class_ce,
                                            self.twin)
            self.opt_D.zero_grad(set_to_none=True)
            loss_d.backward()
            allreduce_mean([p.grad for p in self.D.parameters() if p.grad is not None], self.dist.world)
            self.opt_D.step()
            self.stats.add(**{LOSS_D: loss_d, WASSERSTEIN: parts["wasserstein"], DRIFT: parts["drift"]})
            if "gp" in parts:
                self.stats.add(**{GRADIENT_PENALTY: parts["gp"]})
            if "class_ce" in parts:
                self.stats.add(**{CLASS_CE_REAL: parts["class_ce"]})
            if "class_ce_twin" in parts:
                self.stats.add(**{CLASS_CE_TWIN: parts["class_ce_twin"]})
            if self.ada is not None:
                self.ada.accumulate(parts["d_real"])
        # generator step (classes drawn like the critic's: data frequency, or uniform when balanced;
        # with mode seeking, sample i + n // 2 takes sample i's class: same-class pairs)
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        idx, z, _ = self._draw(n)
        pairs = n // 2 if cfg.mode_seeking > 0 else 0
        if pairs:
            idx = torch.cat([idx[:pairs], idx[:pairs], idx[2 * pairs:]])
        c = self.labels[idx]
        with self._autocast():
            fake = self.G(z, c)
            if cfg.class_ce > 0:
                loss_g, ce, ce_twin = generator_class_losses(self.D, self._augment(fake), c, self.twin)
            else:
                loss_g, ce, ce_twin = generator_loss(self.D, self._augment(fake), c), None, None
            ms = mode_seeking_loss(fake, z, pairs) if pairs else None
            total_g = generator_total(loss_g, ms, ce, ce_twin, mode_seeking=cfg.mode_seeking, class_ce=cfg.class_ce,
                                      class_ce_twin_g=cfg.class_ce_twin_g)
        self.opt_G.zero_grad(set_to_none=True)
        total_g.backward()
        allreduce_mean([p.grad for p in self.G.parameters() if p.grad is not None], self.dist.world)
        self.opt_G.step()
        allreduce_mean([b for b in self.G.buffers() if b.is_floating_point()], self.dist.world)
        self.stats.add(**{LOSS_G: loss_g})    # the adversarial part alone; the mode-seeking term is its own column
        if ms is not None:
            self.stats.add(**{MODE_SEEKING: ms})
        if ce is not None:
            self.stats.add(**{CLASS_CE_FAKE: ce})
        self.g_steps += 1
        self._update_ema(stage)
        if self.ada is not None and (self.it + 1) % cfg.augment_interval == 0:
            self.ada.adjust(allreduce_sum(self.ada.stats(), self.dist.world), cfg.augment_interval * stage.images_per_iter)

    def _set_lr(self) -> None:
        """Both optimisers at their lr x the ramp-down factor of this point of the schedule."""
        scale = lr_scale(self.cfg, self.kimg, self.total_kimg)
        for opt, base in ((self.opt_G, self.cfg.lr_g), (self.opt_D, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * scale

    @torch.no_grad()
    def _update_ema(self, stage: Stage) -> None:
        kimg = self.kimg + stage.images_per_iter / 1000.0
        live = [p.detach() for p in self.G.parameters()]
        for cfg, net in [(self.cfg, self.G_ema), *self.ema_probes.values()]:
            ema = list(net.parameters())
            if ema:
                torch._foreach_lerp_(ema, live, 1.0 - ema_beta(cfg, stage.images_per_iter, kimg))
            for b_ema, b in zip(net.buffers(), self.G.buffers()):
                b_ema.copy_(b)

    # ---- state ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "rng": gather_rng_states(self.gen, self.dist),
        }
        if self.ada is not None:
            state["ada"] = {"p": self.ada.p, "stats": self.ada.stats()}
        if self.ema_probes:
            state["ema_probes"] = {f"{h:g}": net.state_dict() for h, (_, net) in self.ema_probes.items()}
        return state

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
            # an older checkpoint may lack keys added since; it resumes when those are at their defaults
            saved = info.get("params") if isinstance(info.get("params"), dict) else None
            changed = (["<saved params missing>"] if saved is None else changed_keys(self.params.to_dict(), saved))
            if info.get("classes") != self.classes:
                changed.append("classes")
            if changed:
                raise TrainingError(f"{path} was written with a different config ({', '.join(changed)}); train into a "
                                    f"fresh out_dir or pass resume=False (--no-resume) for this stage")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        for h, (_, net) in self.ema_probes.items():   # a probe the checkpoint lacks starts from G_ema here
            net.load_state_dict(state.get("ema_probes", {}).get(f"{h:g}", state["G_ema"]))
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        rng = state["rng"]
        self.gen.set_state(rng[self.dist.rank % len(rng)])
        if self.ada is not None and "ada" in state:
            self.ada.p = state["ada"]["p"].to(self.device)
            self.ada._sign_sum, self.ada._count = (t.to(self.device).clone() for t in state["ada"]["stats"])
        self.stage_index, self.it, self.g_steps = info["stage_index"], info["iteration"], info["g_steps"]
        self.history, self.run_id = list(info["history"]), info.get("mlflow_run_id")
        self.position = (self.stage_index, self.it)
        return info

    # ---- stages -----------------------------------------------------------------------
    def _prepare_stage(self, index: int, resume: bool) -> bool:
        """Bring the state to the start (or resume point) of stage ``index``.

        Order: the stage's own checkpoint (``resume``), else the in-memory state when it is
        the finished previous stage, else the previous stage's finished checkpoint, else
        (first stage) the freshly initialised networks. A new stage after the first starts
        with fresh Adam moments when ``train.reset_optimizers`` is set.

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
            if self.cfg.reset_optimizers:
                self._make_optimizers()
        self.stage_index, self.it = index, 0
        self.position = (index, 0)
        return False

    def _log(self, st: Stage, alpha: float, seconds: float, images: int, bar) -> None:
        means = self.stats.means()     # rank 0's running means (gradients are averaged)
        self.stats.reset()
        row = {KIMG: round(self.kimg, 4), RESOLUTION: float(st.resolution), ALPHA: alpha,
               **{k: means.get(k, float("nan")) for k in (LOSS_D, LOSS_G, WASSERSTEIN, GRADIENT_PENALTY, DRIFT, MODE_SEEKING,
                                                              CLASS_CE_REAL, CLASS_CE_FAKE, CLASS_CE_TWIN)},
               AUGMENT_P: float(self.augment_p) if self.cfg.augment else 0.0,
               LR_SCALE: lr_scale(self.cfg, self.kimg, self.total_kimg),
               IMAGES_PER_S: images / max(seconds, 1e-9), THREADS: float(torch.get_num_threads())}
        if not all_finite([row[LOSS_D], row[LOSS_G]], self.dist):
            raise TrainingError(f"training diverged at {self.kimg:.1f} kimg (loss_D {row[LOSS_D]}, loss_G {row[LOSS_G]} on rank "
                                f"{self.dist.rank}); lower train.lr_d/lr_g or raise gp_lambda")
        self.history.append(row)
        if self.dist.main:
            self.tracker.metrics(row, step=int(round(self.kimg * 1000)))
            write_history_tsv(self.out_dir / HISTORY_TSV, self.history)
            if bar is not None:
                bar.set_postfix_str(f"res {st.resolution} a {alpha:.2f} D {row[LOSS_D]:+.3f} G {row[LOSS_G]:+.3f} "
                                    f"W {row[WASSERSTEIN]:+.3f} p {row[AUGMENT_P]:.2f}")
        if self.device.type == "cpu":
            threads = self.threads.update()
            if threads and threads != torch.get_num_threads():
                torch.set_num_threads(threads)

    def train_stage(self, index: int, bar=None) -> None:
        st = self.schedule[index]
        cfg = self.cfg
        log_every = every(cfg.log_kimg, st.images_per_iter)
        ckpt_every = every(cfg.checkpoint_kimg, st.images_per_iter)
        grid_every = every(cfg.grid_kimg, st.images_per_iter) if cfg.grid_kimg > 0 else 0
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
            if grid_every and self.it % grid_every == 0 and not done:
                self.progress_grid(st, alpha)
            if self.it % ckpt_every == 0 or done:
                self.save(complete=done)
            if self.on_iteration is not None:
                self.on_iteration(self)

    def _grid(self, resolution: int, alpha: float, path: Path) -> Path:
        self.G_ema.set_stage(resolution, alpha)
        grid = class_grid(self.G_ema, len(self.classes), self.cfg.grid_per_class, self.cfg.grid_seed)
        return save_grid_png(path, grid, self.classes)

    def progress_grid(self, st: Stage, alpha: float) -> Path | None:
        """G_ema at the fixed grid z, every condition, now (rank 0): file + MLflow ``grids/progress``."""
        if not self.dist.main:
            return None
        path = self._grid(st.resolution, alpha, stage_dir(self.out_dir, st.resolution) / "progress" / f"grid_{self.kimg:08.2f}kimg.png")
        self.tracker.artifact(path, "grids/progress")
        return path

    def stage_outputs(self, index: int) -> dict[str, Any]:
        """Grid of G_ema per condition at fixed z (rank 0), logged to MLflow."""
        st = self.schedule[index]
        out: dict[str, Any] = {"resolution": st.resolution, "kimg": round(self.kimg, 3)}
        if not self.dist.main:
            return out
        path = self._grid(st.resolution, 1.0, stage_dir(self.out_dir, st.resolution) / f"grid_{st.resolution}.png")
        self.tracker.artifact(path, "grids")
        out["grid"] = str(path)
        return out


def write_history_tsv(path: Path, history: list[dict[str, float]]) -> Path:
    """The metric history as TSV (one row per log, ``kimg`` first): ``dvc plots`` reads it."""
    from radsynth.io import atomic_write_text

    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append("\t".join(_tsv_value(row.get(k, float("nan"))) for k in HISTORY_COLUMNS))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def _tsv_value(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.6g}"


def plot_curves(history: list[dict[str, float]], path: Path) -> Path | None:
    """Training curves (losses, Wasserstein estimate, gradient penalty, mode-seeking and class terms vs kimg) as PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radsynth.io import atomic_path

    kimg = [h[KIMG] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax_i in ((LOSS_D, 0), (LOSS_G, 0), (WASSERSTEIN, 1), (GRADIENT_PENALTY, 2), (MODE_SEEKING, 2),
                       (CLASS_CE_REAL, 2), (CLASS_CE_FAKE, 2), (CLASS_CE_TWIN, 2)):
        values = [h.get(key, float("nan")) for h in history]
        if any(math.isfinite(v) for v in values):
            axes[ax_i].plot(kimg, values, label=key.split("/")[-1])
    changes = [history[i][KIMG] for i in range(1, len(history)) if history[i][RESOLUTION] != history[i - 1][RESOLUTION]]
    for ax, title in zip(axes, ("losses", "Wasserstein estimate", "regularisers")):
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
    summary: dict[str, Any] = {"variant": params.model.variant, "recipe": params.train.recipe,
                               "schedule": [dataclasses.asdict(s) for s in schedule], "stages": []}
    status = "FAILED"
    try:
        for index in indices:
            st = schedule[index]
            bar.set_description(f"train {st.resolution}x{st.resolution}")
            already = trainer._prepare_stage(index, resume=resume)
            if trainer.tracker.enabled and trainer.tracker.run_id is None:
                trainer.run_id = trainer.tracker.start(trainer.run_id, {"variant": params.model.variant, "recipe": params.train.recipe})
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
                    "seed": params.seed, "train_run_id": trainer.run_id, "recipe": params.train.recipe, "ema_kimg": params.train.ema_kimg}
            summary["G_ema"] = str(save_generator(out_dir / "G_ema.safetensors", trainer.G_ema, meta))
            summary["ema_probes"] = {f"{h:g}": str(save_generator(ema_probe_path(out_dir, h), net, {**meta, "ema_kimg": h}))
                                     for h, (_, net) in trainer.ema_probes.items()}
        if trainer.dist.main and trainer.history:
            write_history_tsv(out_dir / HISTORY_TSV, trainer.history)
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
                       world_size=trainer.dist.world, device=str(trainer.device), amp=trainer.amp,
                       threads=torch.get_num_threads(), tracking_warnings=trainer.tracker.failures)
        status = "FINISHED"
        return summary
    finally:
        bar.close()
        trainer.tracker.end(status)
        if trainer.dist.owns_group:
            dist.destroy_process_group()
