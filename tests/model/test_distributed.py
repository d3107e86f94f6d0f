"""Devices and CPU threads: a rank's own device, and threads that back off when the cores are busy."""

import multiprocessing as mp
import time

import pytest
import torch

from model.distributed import CpuThreads, Dist, all_finite, gather_rng_states, resolve_device, usable_cores
from model.schedule import TrainingError


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_threads_are_taken_as_given_or_measured_from_the_machine():
    assert CpuThreads(3).initial() == 3 and CpuThreads(3).update() is None
    auto = CpuThreads(0)
    n = auto.initial(probe_s=0.3)
    assert 1 <= n <= usable_cores()


@pytest.mark.skipif(usable_cores() < 2, reason="needs two cores to see one taken")
def test_threads_drop_to_one_while_other_processes_hold_the_cores():
    auto = CpuThreads(0)
    auto.initial(probe_s=0.05)
    procs = [mp.get_context("fork").Process(target=_spin, args=(2.5,)) for _ in range(usable_cores())]
    for p in procs:
        p.start()
    try:
        time.sleep(0.3)
        auto.update()                      # start a fresh interval while the spinners run
        time.sleep(1.0)
        busy = auto.update()
    finally:
        for p in procs:
            p.join()
    assert busy == 1


def test_a_cuda_request_without_cuda_is_a_clear_error_and_auto_is_the_cpu_here(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(TrainingError, match="CUDA is not available"):
        resolve_device("cuda")


def test_single_process_collectives_are_local():
    d = Dist()
    gen = torch.Generator().manual_seed(3)
    (state,) = gather_rng_states(gen, d)
    assert torch.equal(state, gen.get_state()) and state.device.type == "cpu"
    assert all_finite([1.0, -2.0], d) and not all_finite([1.0, float("nan")], d) and not all_finite([float("inf")], d)
