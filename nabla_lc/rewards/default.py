"""The default reward of the embedded policy: a LoRA reward on SmolLM2-135M-Instruct's own backbone.

The file ships in the package; :mod:`nabla_lc.bench.reward_recipe` (``nabla-lc train-default-reward``) writes it
from the policy's own sampled ``arith`` answers, labeled by the checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import NablaConfig
from .lora import LoRAReward

DEFAULT_REWARD_FILE = Path(__file__).resolve().parent.parent / "data" / "smollm2-arith-reward.safetensors"
"""The shipped reward file (adapter, head and settings in one safetensors file) inside the package."""
RECIPE_COMMAND = "nabla-lc train-default-reward"
"""The command that writes :data:`DEFAULT_REWARD_FILE`."""

DEFAULT_REWARD_GRAD_THRESHOLD = 0.01
"""ε_grad for this reward. Its probe gradient norms (authors' scale) are far below the paper's 8: on a level-2 dev
question they ranged 0 to 0.046 with median 0.01 (README, "The embedded default"), so 0.01 sends about half of
the uncertain positions to DTO."""
DEFAULT_MAX_NEW_TOKENS = 96
"""Response length the reward was trained at (and ``arith``'s default level was calibrated at)."""
DEFAULT_TARGET_KL = 0.5
"""The trust-region step's KL for this policy, chosen on arith dev (BENCHMARKS.md, "DTO's step"): the paper's step
moved its proposal distribution by KL 0.007 and the chance of a different token from 0.108 to 0.131; at 0.5 that
chance reaches 0.384, with dev accuracy equal to plain rejection sampling's."""


def default_reward_config() -> NablaConfig:
    """The paper's settings with four changes for this policy and reward on a CPU.

    ε_grad rescaled to this reward (:data:`DEFAULT_REWARD_GRAD_THRESHOLD`); DTO on the position being decided
    only (``dto_positions="first"``: with every rollout position optimized, one solve ran over 6 minutes for
    6 tokens on 2 cores, because the argmax somewhere in the rollout changes at almost every step and gradient
    caching rarely hits); at most :data:`DEFAULT_MAX_NEW_TOKENS` new tokens, the length the reward was
    trained at and ``arith`` calibrated at; and the trust-region step at :data:`DEFAULT_TARGET_KL` (the paper's
    AdamW step barely moves this policy). Any field can still be set (``step="adam"`` for the paper's step).
    """
    return NablaConfig(
        grad_threshold=DEFAULT_REWARD_GRAD_THRESHOLD,
        dto_positions="first",
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        step="trust_region",
        target_kl=DEFAULT_TARGET_KL,
    )


def load_default_reward(policy_model: nn.Module, tokenizer: Any, path: str | Path = DEFAULT_REWARD_FILE) -> LoRAReward:
    """The shipped LoRA reward, injected into ``policy_model`` (the embedded SmolLM2): one shared backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the default reward file {path} is missing; write it with: {RECIPE_COMMAND}")
    return LoRAReward.load(path, policy_model, tokenizer)
