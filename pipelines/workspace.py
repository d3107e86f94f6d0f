"""Run one project step inside a Kubeflow task: artefacts in, the step's entry point, artefacts out.

Every step reads and writes the conventional folders under ``paths.artifacts``
(``dataset/``, ``train/``, ...). A Kubeflow task instead receives its inputs as artefact
paths and must write its outputs to other artefact paths. :func:`step_workspace` bridges the
two: it lays the input artefacts out as an artefacts root (read-only inputs are linked, a
folder the step also writes is copied, so an upstream artefact is never modified), points
``paths.artifacts`` there, and after the step copies the produced folders onto the output
artefacts and logs the step's ``metrics.json`` as KFP metrics.

The components in ``components/<step>.py`` are a few lines on top of this; the same
``radsynth <step>`` entry point runs under DVC, so nothing is implemented twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from radsynth.errors import RadsynthError

METRICS_FILE = "metrics.json"


class StepFailed(RadsynthError):
    """A step's entry point returned a non-zero exit status inside a pipeline task."""


@dataclass
class Workspace:
    """What a component body gets: the artefacts root and the CLI arguments that select it."""

    root: Path                                  # artefacts root the step reads and writes
    cli_args: list[str] = field(default_factory=list)  # --profile/--set flags for `radsynth <step>`
    profile: str = "cpu"                        # the params profile of the run
    sets: list[str] = field(default_factory=list)  # every key=value override, paths.artifacts last

    @property
    def params(self):
        """The resolved config with this workspace's overrides (``paths.artifacts`` = root)."""
        from radsynth.config import load_params, parse_override

        return load_params(profile=self.profile, overrides=dict(parse_override(s) for s in self.sets))

    def run(self, step: str, *extra: str) -> int:
        """Run ``radsynth <step> <common flags> <extra>`` in this process.

        Returns:
            The exit status (0 on success).
        """
        from radsynth.cli import main

        return int(main([step, *self.cli_args, *extra]) or 0)

    def check(self, step: str, *extra: str) -> None:
        """Like :meth:`run`, but raise :class:`StepFailed` on a non-zero status."""
        status = self.run(step, *extra)
        if status != 0:
            raise StepFailed(f"radsynth {step} exited with status {status}; its message is above")

    def read_metrics(self, folder: str, name: str = METRICS_FILE) -> dict[str, Any]:
        """The JSON summary (default ``metrics.json``) a step wrote in ``folder`` ({} when none)."""
        path = self.root / folder / name
        return json.loads(path.read_text()) if path.is_file() else {}


def overrides_from(values: Sequence[str] | None) -> list[str]:
    """Validate ``key=value`` strings given to a pipeline run (the ``--set`` syntax)."""
    out = []
    for item in values or []:
        if not isinstance(item, str) or "=" not in item:
            raise RadsynthError(f"pipeline override {item!r}: expected key=value, e.g. train.lr_g=2e-3")
        out.append(item)
    return out


@contextlib.contextmanager
def step_workspace(
    profile: str,
    overrides: Sequence[str] | None,
    inputs: Mapping[str, str | None] | None = None,
    outputs: Mapping[str, str] | None = None,
    metrics: Any = None,
    extra_overrides: Sequence[str] = (),
    metrics_file: str = METRICS_FILE,
) -> Iterator[Workspace]:
    """Lay out an artefacts root for one step and publish its outputs afterwards.

    Args:
        profile: params profile (``tiny`` | ``cpu`` | ``gpu``).
        overrides: ``key=value`` strings applied after the profile (pipeline parameter).
        inputs: artefact folder name (``dataset``, ``train``, ...) -> input artefact path.
            ``None`` paths (an optional input not given) are skipped.
        outputs: artefact folder name -> output artefact path; the produced folder is
            copied there when the body succeeds. A folder in both ``inputs`` and
            ``outputs`` is copied in (not linked) so the upstream artefact stays untouched.
        metrics: a KFP ``Output[Metrics]``; the top-level numeric values of the first
            output folder's ``metrics_file`` are logged on it.
        extra_overrides: more ``key=value`` strings set by the component itself.
        metrics_file: the JSON file (in the first output folder) whose numbers are logged.

    Yields:
        The :class:`Workspace`.
    """
    inputs = {k: v for k, v in (inputs or {}).items() if v}
    outputs = dict(outputs or {})
    tmp = Path(tempfile.mkdtemp(prefix="radsynth-step-"))
    root = tmp / "artifacts"
    root.mkdir()
    try:
        for name, src in inputs.items():
            src_path = Path(src)
            if not src_path.exists():
                raise RadsynthError(f"input artefact {name!r} not found at {src}")
            if name in outputs:
                _copy(src_path, root / name)
            else:
                os.symlink(src_path.resolve(), root / name, target_is_directory=src_path.is_dir())
        sets = [*overrides_from(overrides), *extra_overrides, f"paths.artifacts={root}"]
        args = ["--profile", profile]
        for item in sets:
            args += ["--set", item]
        ws = Workspace(root=root, cli_args=args, profile=profile, sets=sets)
        yield ws
        for name, dst in outputs.items():
            produced = root / name
            if not produced.exists():
                raise RadsynthError(f"step produced no {name}/ folder under {root}")
            _copy(produced, Path(dst))
        if metrics is not None and outputs:
            log_metrics(metrics, ws.read_metrics(next(iter(outputs)), metrics_file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def log_metrics(metrics: Any, values: Mapping[str, Any]) -> int:
    """Log the finite numeric entries of a flat metrics dict on a KFP Metrics artefact.

    Returns:
        How many values were logged.
    """
    n = 0
    for key, value in sorted(values.items()):
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(key, float(value))
            n += 1
    return n


def raw_overrides(profile: str, overrides: Sequence[str] | None, raw_dir: str) -> list[str]:
    """Overrides that point the configured export paths at ``raw_dir`` (see :func:`rebase_raw`)."""
    from radsynth.config import load_params, parse_override

    params = load_params(profile=profile, overrides=dict(parse_override(s) for s in overrides_from(overrides)))
    data = params.data
    return rebase_raw(params.paths.raw, raw_dir, {"data.dicom_dir": data.dicom_dir, "data.labels_csv": data.labels_csv,
                                                  "data.image_dir": data.image_dir})


def rebase_raw(params_raw: str, raw_dir: str, configured: Mapping[str, str]) -> list[str]:
    """Overrides that move data paths configured under ``paths.raw`` onto ``raw_dir``.

    Args:
        params_raw: the configured ``paths.raw`` (e.g. ``data``).
        raw_dir: where the export is in this task (a mounted volume, or a local folder).
        configured: dotted key -> configured path, e.g. ``{"data.dicom_dir": "data/dicom"}``.

    Returns:
        ``key=value`` override strings (empty when ``raw_dir`` is the configured root).
    """
    if not raw_dir or Path(raw_dir) == Path(params_raw):
        return []
    out = [f"paths.raw={raw_dir}"]
    base = Path(params_raw)
    for key, value in configured.items():
        if not value:
            continue
        p = Path(value)
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        out.append(f"{key}={Path(raw_dir) / rel}")
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=False)
    else:
        shutil.copy2(src, dst)
