"""The evaluation gate's verdict as the steps after ``evaluate`` read it: ``<eval_dir>/gate.json``.

``components/evaluate.py`` writes the file (its module docstring describes it); ``export``,
``encoder`` and ``register`` read it here, so they run without the evaluation code and a change
to a metric or the judge does not count as a change to them.
"""

from __future__ import annotations

import json
from pathlib import Path

from radsynth.errors import RadsynthError

GATE_FILE = "gate.json"


def gate_verdict(eval_dir: str | Path) -> str:
    """``"passed"`` or ``"failed"`` from ``gate.json``.

    Raises:
        RadsynthError: there is no verdict to read.
    """
    path = Path(eval_dir) / GATE_FILE
    if not path.is_file():
        raise RadsynthError(f"{path}: no gate report; run `radsynth evaluate` first")
    return "passed" if json.loads(path.read_text()).get("passed") else "failed"


def refusal(eval_dir: str | Path, step: str) -> dict | None:
    """``None`` when the gate in ``eval_dir`` passed; else the record a refusing step writes.

    Raises:
        RadsynthError: there is no verdict to read.
    """
    path = Path(eval_dir) / GATE_FILE
    if gate_verdict(eval_dir) == "passed":
        return None
    gate = json.loads(path.read_text())
    details = [c["detail"] for c in gate.get("checks", []) if not c.get("passed")]
    return {"step": step, "refused": True, "gate": "failed", "level": gate.get("level", "release"),
            "failed": gate.get("failed", []),
            "reason": f"the evaluation gate failed at {gate.get('level', 'release')} level ({path}): " + ("; ".join(details) or "see gate.md")}
