"""Shared fixtures: a tiny causal Wan of the real architecture, with random weights, on CPU."""

from __future__ import annotations

import pytest
import torch

from common.causal_wan import CausalWanTransformer3DModel
from common.config import load_config
from common.sampler import StreamingSampler

TINY = "configs/tiny.yaml"


def tiny_config(*overrides: str):
    return load_config(TINY, list(overrides))


@pytest.fixture(scope="session")
def tiny_model() -> CausalWanTransformer3DModel:
    torch.manual_seed(0)
    cfg = tiny_config()
    return CausalWanTransformer3DModel(**cfg.model.transformer.kwargs()).eval()


def make_sampler(model, *overrides: str) -> StreamingSampler:
    return StreamingSampler.from_config(model, tiny_config(*overrides))


@pytest.fixture()
def text() -> torch.Tensor:
    return torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(7))
