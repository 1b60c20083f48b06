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


def default_reward_config() -> NablaConfig:
    """The paper's settings with ε_grad rescaled for this reward (:data:`DEFAULT_REWARD_GRAD_THRESHOLD`)."""
    return NablaConfig(grad_threshold=DEFAULT_REWARD_GRAD_THRESHOLD)


def load_default_reward(policy_model: nn.Module, tokenizer: Any, path: str | Path = DEFAULT_REWARD_FILE) -> LoRAReward:
    """The shipped LoRA reward, injected into ``policy_model`` (the embedded SmolLM2): one shared backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the default reward file {path} is missing; write it with: {RECIPE_COMMAND}")
    return LoRAReward.load(path, policy_model, tokenizer)
