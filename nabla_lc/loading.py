"""One factory for an engine: the policy, the reward (with its vocabulary check) and the config recommended for them.

The CLI, ``NablaReasonerLLM.from_pretrained`` and ``NablaReasonerLLM.embedded`` all build engines here, so
they load the same way from the same arguments.
"""

from __future__ import annotations

import torch

from . import models
from .config import NablaConfig
from .facade import Engine
from .rewards.base import RewardAdapter
from .rewards.default import default_reward_config
from .rewards.load import load_reward


def recommended_config(reward: RewardAdapter | str | None) -> NablaConfig:
    """The settings to start from with ``reward``: :func:`default_reward_config` for the project's default
    reward (named ``"default"``), else the paper's (``NablaConfig()``)."""
    return default_reward_config() if reward == "default" else NablaConfig()


def load_engine(
    policy: str = "embedded",
    reward: RewardAdapter | str | None = "default",
    *,
    config: NablaConfig | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    vocab_bridge: bool = False,
    trust_remote_code: bool = False,
) -> Engine:
    """An engine over ``policy`` (``"embedded"``, a checkpoint directory, a GGUF file or a cached model id) and
    ``reward`` (an adapter, or a name or path for :func:`~nabla_lc.rewards.load.load_reward`).

    ``config`` becomes the engine's config; by default :func:`recommended_config` for the reward.
    ``vocab_bridge`` and ``trust_remote_code`` apply to reward checkpoints.
    """
    model, tokenizer = models.load_policy(policy, device=device, dtype=dtype)
    adapter = (
        load_reward(reward, model, tokenizer, dtype=dtype, vocab_bridge=vocab_bridge, trust_remote_code=trust_remote_code)
        if isinstance(reward, str)
        else reward
    )
    return Engine(model, tokenizer, adapter, config if config is not None else recommended_config(reward))
