"""Shared fixtures: tiny models built in-process."""

from __future__ import annotations

import pytest
import torch

from nabla_lc import Engine, NablaConfig

from .tiny import make_classifier_reward, make_policy, make_tokenizer

torch.set_num_threads(1)  # why: tiny models gain nothing from threads, and oversubscribed cores lose a lot


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tokenizer) -> Engine:
    """A tiny llama policy with a tiny sequence-classifier reward over the same vocabulary; short responses."""
    model = make_policy(tokenizer, "llama")
    return Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=24))
