"""How a step's Kubeflow component is declared, and the image it runs in.

``@step_component`` on a plain typed function in ``pipelines/steps.py`` makes it a KFP
lightweight component running in the project image (``pipeline.image:pipeline.image_tag``),
with nothing installed at start-up (``install_kfp_package=False``: the image has kfp).
It also resolves PEP 563 string annotations (``from __future__ import annotations``), which
KFP would otherwise read as artefact type names; the function's module must import the KFP
types it names (``from kfp.dsl import Input, Output, Artifact, ...``).

Components are declared when ``pipelines.steps`` is imported (by the pipeline, never by a
``radsynth <step>`` run), with the image read from ``params.yaml`` then: ``$RADSYNTH_PARAMS``,
else ``./params.yaml``, else the file beside this checkout. ``$RADSYNTH_IMAGE`` (``name:tag``)
overrides it, e.g. for a CI build that tags images with the git sha; ``build_pipeline`` sets
the image from the params it compiles. The image holds the code and the pinned environment,
so nothing is installed when a task starts.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Callable

from radsynth.config import DEFAULT_PARAMS, PARAMS_ENV, ConfigError, PipelineConfig, load_params

IMAGE_ENV = "RADSYNTH_IMAGE"
_PROJECT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def image_ref(cfg: PipelineConfig) -> str:
    """``name:tag`` of the project image described by a pipeline config."""
    return f"{cfg.image}:{cfg.image_tag}"


def component_image() -> str:
    """The base image for every component (see the module docstring for the lookup order)."""
    override = os.environ.get(IMAGE_ENV)
    if override:
        return override
    for candidate in (os.environ.get(PARAMS_ENV), DEFAULT_PARAMS, _PROJECT_PARAMS):
        if candidate and Path(candidate).is_file():
            try:
                return image_ref(load_params(candidate).pipeline)
            except ConfigError:
                # Declaring the components must not fail on a params problem: a run reports
                # it clearly, and build_pipeline sets the image from the params it compiles.
                break
    return image_ref(PipelineConfig())


def step_component(func: Callable) -> Callable:
    """Decorator: ``func`` as a KFP component in the project image (see the module docstring)."""
    from kfp import dsl

    func.__annotations__ = typing.get_type_hints(func, include_extras=True)
    return dsl.component(base_image=component_image(), install_kfp_package=False)(func)
