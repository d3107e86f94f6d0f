"""Devices, CPU threads and DDP helpers for the trainer (gloo on CPU, NCCL on CUDA).

Ranks start from the same weights, each draws its own batch share with its own RNG stream,
and gradients are averaged with one ``all_reduce`` per step (the gradient penalty's double
backward rules out DDP's reducer hooks). Everything here is correct for NCCL too: tensors
that take part in a collective live on the rank's device (``LOCAL_RANK``), and decisions
that end training (divergence) are agreed by every rank, so none is left waiting in a
collective the others have abandoned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

from model.schedule import TrainingError


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) when CUDA is there, else the CPU.

    ``cuda`` without an index also means this rank's GPU; ``cuda:N`` is taken as given.
    """
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"train.device={name!r} but CUDA is not available here; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank())
    return device


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """CPU-seconds all cores have spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)            # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuThreads:
    """Torch intra-op threads for a CPU run: given, or "from the machine" (``train.threads: 0``).

    From the machine: the cores this process may use (shared among local DDP ranks), less
    the cores other processes keep busy, re-measured at every log interval from
    ``/proc/stat`` minus this process's own CPU time. Spinning OpenMP threads on cores that
    other work holds are far slower than one thread (docs/benchmarks.md), so on a busy
    machine this drops to 1 and comes back when the cores free up. A run with a changing
    thread count is not bitwise reproducible; set ``train.threads`` for that.
    """

    def __init__(self, requested: int):
        self.fixed = requested > 0
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        self.share = requested if self.fixed else max(1, usable_cores() // max(ranks, 1))
        self.ranks = max(ranks, 1)
        self._mark = self._now()

    @staticmethod
    def _now() -> tuple[float, float | None, float]:
        import time

        return time.monotonic(), _busy_seconds(), time.process_time()

    def initial(self, probe_s: float = 0.25) -> int:
        if self.fixed or self.ranks > 1:
            return self.share
        import time

        self._mark = self._now()
        time.sleep(probe_s)
        return self.update() or self.share

    def update(self) -> int | None:
        """The thread count for the next interval (None: keep the current one)."""
        if self.fixed or self.ranks > 1:
            return None
        now = self._now()
        (t0, b0, c0), (t1, b1, c1) = self._mark, now
        self._mark = now
        if b0 is None or b1 is None or t1 - t0 < 0.05:
            return None
        others = max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0)                 # cores busy with other work
        return int(min(self.share, max(1, round(usable_cores() - others))))


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    owns = False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns, device=device)


def allreduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average ``tensors`` (same device) over the ranks in place, one collective."""
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


def allreduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def all_finite(values: list[float], d: Dist) -> bool:
    """True when every value is finite on every rank (every rank gets the same answer)."""
    ok = torch.tensor([1.0 if all(v == v and abs(v) != float("inf") for v in values) else 0.0], device=d.device)
    if d.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0.5)


def gather_rng_states(gen: torch.Generator, d: Dist) -> list[torch.Tensor]:
    """Every rank's generator state (uint8 CPU tensors), in rank order.

    NCCL collectives take device tensors only, so the states travel through the rank's
    device and come back to the CPU (``get_state`` is always a CPU tensor, also for a CUDA
    generator).
    """
    state = gen.get_state()
    if d.world <= 1:
        return [state]
    moved = state.to(d.device)
    out = [torch.empty_like(moved) for _ in range(d.world)]
    dist.all_gather(out, moved)
    return [t.cpu() for t in out]


def params_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
