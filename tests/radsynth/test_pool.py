"""radsynth.pool: a worker that crashes (real signals) or hangs costs its task only."""

from __future__ import annotations

import ctypes
import os
import signal
import time

from radsynth.pool import Failure, supervised_map

_INIT_COUNT: list[int] = []


def _init(tag: str) -> None:
    os.environ["RADSYNTH_POOL_TAG"] = tag


def _work(x: int):
    if x == 3:
        import faulthandler

        faulthandler.disable()  # pytest's handler would print a traceback for the expected crash
        ctypes.string_at(0)  # a real segmentation fault, as a broken codec would give
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    if x == 7:
        os._exit(3)
    if x == 9:
        time.sleep(60)  # a decoder stuck in a loop
    return (x * 10, os.environ.get("RADSYNTH_POOL_TAG"), os.getpid())


def test_crashes_and_hangs_become_failures_and_every_other_task_completes():
    started = time.monotonic()
    out = dict(supervised_map(_work, range(12), 2, initializer=_init, initargs=("ok",), timeout_s=3, chunk=3))
    assert sorted(out) == list(range(12))
    failures = {i: r for i, r in out.items() if isinstance(r, Failure)}
    assert {i: f.reason for i, f in failures.items()} == {3: "worker_crashed", 5: "worker_crashed", 7: "worker_crashed", 9: "timeout"}
    assert "SIGSEGV" in failures[3].detail and "SIGKILL" in failures[5].detail and "status 3" in failures[7].detail
    for i, r in out.items():
        if i not in failures:
            assert r[:2] == (i * 10, "ok")  # replacement workers ran the initializer too
    assert len({r[2] for r in out.values() if not isinstance(r, Failure)}) >= 3  # crashed workers were replaced
    assert time.monotonic() - started < 55  # the hang did not hold the run for its 60 s


def test_no_worker_outlives_the_map():
    pids = set()
    for _, r in supervised_map(_work, [1, 2, 4, 6], 2):
        pids.add(r[2])
    time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive


def test_a_generator_closed_early_stops_its_workers():
    import psutil

    before = {c.pid for c in psutil.Process().children()}   # e.g. a server another test's fixture keeps running
    gen = supervised_map(_work, [1, 9], 2, timeout_s=60)
    index, result = next(gen)  # task 0 finishes; task 1 hangs in the other worker
    assert index == 0 and result[0] == 10
    workers = [c for c in psutil.Process().children() if c.pid != result[2] and c.pid not in before]
    started = time.monotonic()
    gen.close()
    assert time.monotonic() - started < 10
    assert workers and not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
