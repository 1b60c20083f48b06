"""Shared fixtures: tiny models built in-process."""

from __future__ import annotations

import pytest
import torch

from nabla_lc import Engine, NablaConfig

from .tiny import LinearReward, make_policy, make_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tokenizer) -> Engine:
    """A tiny llama policy with a cheap differentiable reward; short responses."""
    model = make_policy(tokenizer, "llama")
    return Engine(model, tokenizer, LinearReward(model.config.vocab_size), NablaConfig(max_new_tokens=24))
