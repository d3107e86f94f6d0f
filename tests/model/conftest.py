"""Tiny seeded model configs shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from radsynth.config import ModelConfig


def tiny_model_config(variant: str = "pgcgan-sa", **kw) -> ModelConfig:
    base = dict(variant=variant, z_dim=16, label_dim=8, fmap_base=256, fmap_max=32, fmap_min=8, attention_resolutions=(8,), mbstd_group=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every model test runs on one torch thread (see tests/conftest.py)."""
