"""Turning a reward name or path (CLI flags, ``from_pretrained``) into a :class:`RewardAdapter`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardAdapter

log = logging.getLogger(__name__)

REWARD_CHOICES = "'default' (the project's reward for the embedded policy), 'judge' (self-judging), 'none', a LoRA reward .safetensors file, or a checkpoint directory"


def load_reward(
    spec: str | None,
    policy_model: nn.Module,
    policy_tokenizer: Any,
    dtype: torch.dtype | None = None,
    vocab_bridge: bool = False,
    trust_remote_code: bool = False,
) -> RewardAdapter | None:
    """A reward from its name or local path: see :data:`REWARD_CHOICES`. Reward checkpoints load next to the policy.

    The reward's :attr:`~nabla_lc.rewards.base.RewardAdapter.name` is ``judge``, a file's path and content hash, or
    a checkpoint directory's path.
    """
    reward = _load(spec, policy_model, policy_tokenizer, dtype, vocab_bridge, trust_remote_code)
    if reward is not None and reward.name is None:
        reward.name = spec if spec == "judge" else str(Path(spec).expanduser().resolve())  # type: ignore[arg-type]
    return reward


def _load(
    spec: str | None, policy_model: nn.Module, policy_tokenizer: Any, dtype: torch.dtype | None, vocab_bridge: bool, trust_remote_code: bool
) -> RewardAdapter | None:
    if spec is None or spec == "none":
        return None
    if spec == "default":
        from .default import load_default_reward

        return load_default_reward(policy_model, policy_tokenizer)
    if spec == "judge":
        from .judge import SelfJudgeReward

        return SelfJudgeReward(policy_model, policy_tokenizer)
    path = Path(spec).expanduser()
    if path.is_file():
        from .lora import LoRAReward

        return LoRAReward.load(path, policy_model, policy_tokenizer)
    if path.is_dir():
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or [""]
        where = dict(device=next(policy_model.parameters()).device, dtype=dtype, policy_tokenizer=policy_tokenizer, vocab_bridge=vocab_bridge)
        if architectures[0].endswith("ForSequenceClassification"):
            from .classifier import SequenceClassifierReward

            return SequenceClassifierReward.from_pretrained(str(path), **where)
        from .process import ProcessReward

        return ProcessReward.from_pretrained(str(path), trust_remote_code=trust_remote_code, **where)
    raise FileNotFoundError(f"no reward {spec!r}: expected {REWARD_CHOICES}")
