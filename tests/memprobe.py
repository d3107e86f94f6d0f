"""Peak memory growth of one call, measured as the kernel sees it (C allocations included).

``tracemalloc`` sees only Python's allocator, not a codec's ``malloc`` (openjpeg, zlib,
Pillow); so the call runs in a child process and the growth is read from ``/proc``: the
peak-RSS mark is reset (``clear_refs`` 5), the call runs, and ``VmHWM - VmRSS(before)`` is
the peak growth. glibc's mmap threshold is fixed at 128 KiB in the child, so a large block
freed by an earlier call goes back to the kernel instead of being reused unseen; each case
also runs once before it is measured (first-use imports and caches are not counted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

_CHILD = r'''
import json, re, sys, traceback

def _status(key):
    with open("/proc/self/status") as fh:
        return int(re.search(key + r":\s+(\d+)", fh.read()).group(1)) * 1024

exec(compile(__SETUP__, "<setup>", "exec"))
out = {}
for name in __CASES__:
    result = None
    for attempt in range(2):  # the first run warms imports and caches; the second is measured
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        try:
            result = {"value": CALL(name), "error": None}
        except BaseException as exc:
            result = {"value": None, "error": type(exc).__name__ + ": " + str(exc)[:300]}
        result["growth"] = _status("VmHWM") - before
    out[name] = result
print("@@RESULT@@" + json.dumps(out, default=str))
'''


def measure(setup: str, cases: list[str], timeout_s: float = 300.0) -> dict[str, dict]:
    """Run ``CALL(name)`` (defined by ``setup``) for every case in a child; per case
    ``{"value": CALL's JSON-able return, "error": str | None, "growth": peak bytes}``."""
    code = _CHILD.replace("__SETUP__", repr(textwrap.dedent(setup))).replace("__CASES__", repr(list(cases)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": "1", "GX_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_TELEMETRY": "false"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout_s)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        raise AssertionError(f"memory probe failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.loads(marker[-1][len("@@RESULT@@"):])
    for value in results.values():
        value["stderr"] = proc.stderr
    return results
