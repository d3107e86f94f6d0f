"""A process pool that survives its workers: a crash or a hang costs one task, never the run.

``multiprocessing.Pool.imap`` waits forever for a task whose worker was killed (the OOM killer,
a codec's segfault): the result never comes. :func:`supervised_map` gives every worker its own
pipe and knows which task each one holds (results come back in the order the tasks were sent),
so when a worker dies the task it was on is reported as a :class:`Failure` (``worker_crashed``),
the rest of its chunk goes back to the queue, and a fresh worker takes its place. A task that
runs longer than ``timeout_s`` gets its worker killed and becomes a ``timeout`` failure.

Workers are forked (the parent's imports and arguments are inherited, nothing is re-imported).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing as mp
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class Failure:
    """A task whose worker died or overran; ``reason`` is ``worker_crashed`` or ``timeout``."""

    reason: str
    detail: str


def _serve(conn, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple) -> None:
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for index, task in batch:
            conn.send((index, fn(task)))


class _Worker:
    def __init__(self, ctx, fn, initializer, initargs):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, fn, initializer, initargs), daemon=True)
        self.proc.start()
        child.close()
        self.pending: collections.deque = collections.deque()
        self.since = time.monotonic()

    def stop(self, kill: bool = False) -> None:
        if kill and self.proc.is_alive():
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        try:
            self.conn.close()
        except OSError:
            pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "was killed"
    if code < 0:
        import signal

        try:
            return f"ended by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"ended by signal {-code}"
    return f"exited with status {code}"


def supervised_map(fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int, *,
                   initializer: Callable[..., None] | None = None, initargs: tuple = (),
                   timeout_s: float | None = None, chunk: int = 1) -> Iterator[tuple[int, Any]]:
    """``fn`` over ``tasks`` in ``workers`` forked processes; yields ``(task index, result)``.

    The result is ``fn(task)``'s return value, or a :class:`Failure` when the worker holding the
    task died (``worker_crashed``) or spent more than ``timeout_s`` on it (``timeout``).
    Results arrive in completion order. ``fn`` should catch its own exceptions (an uncaught
    one ends its worker, and is reported like a crash).

    Args:
        fn: a picklable-free top-level function (workers are forked, nothing is pickled but
            tasks and results).
        tasks: the inputs.
        workers: processes (at least 1).
        initializer: run once in every worker (also in a replacement) with ``initargs``.
        timeout_s: the most one task may take; ``None``: no limit.
        chunk: tasks sent to a worker at once (results still come back one by one).
    """
    ctx = mp.get_context("fork")
    queue = collections.deque(enumerate(tasks))
    total = len(queue)
    done = 0
    pool = [_Worker(ctx, fn, initializer, initargs) for _ in range(max(1, min(workers, total or 1)))]
    try:
        while done < total:
            for i, w in enumerate(pool):
                if not w.pending and queue:
                    batch = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                    try:
                        w.conn.send(batch)
                    except (OSError, ValueError):  # it died while idle: a fresh worker takes the batch next round
                        queue.extendleft(reversed(batch))
                        w.stop(kill=True)
                        pool[i] = _Worker(ctx, fn, initializer, initargs)
                        continue
                    w.pending.extend(batch)
                    w.since = time.monotonic()
            waiting = [w for w in pool if w.pending]
            ready = set(wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], timeout=0.5))
            now = time.monotonic()
            for i, w in enumerate(pool):
                if not w.pending:
                    continue
                failure = None
                if w.conn in ready or w.proc.sentinel in ready:
                    try:
                        while w.pending and w.conn.poll():
                            index, result = w.conn.recv()
                            expected, _ = w.pending.popleft()
                            assert index == expected, "results come back in the order the tasks were sent"
                            w.since = now
                            done += 1
                            yield index, result
                    except (EOFError, OSError):
                        pass
                    if w.pending and not w.proc.is_alive():
                        w.proc.join()
                        failure = Failure("worker_crashed", f"the decoding process {_exit_text(w.proc.exitcode)} on this record")
                if failure is None and w.pending and timeout_s is not None and now - w.since > timeout_s:
                    failure = Failure("timeout", f"decoding took longer than {timeout_s:g} s; its process was stopped")
                if failure is not None:
                    index, _ = w.pending.popleft()
                    queue.extendleft(reversed(w.pending))  # the rest of its chunk goes to another worker
                    w.pending.clear()
                    done += 1
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, fn, initializer, initargs)
                    yield index, failure
    finally:
        for w in pool:
            w.stop(kill=bool(w.pending))
