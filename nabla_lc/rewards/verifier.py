"""A reward from any Python function of the prompt and the response text; it has no gradient."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import RewardAdapter, Scores


class VerifierReward(RewardAdapter):
    """``fn(prompt, response_text) -> float``: exact-match checkers, unit tests, answer graders.

    It cannot take gradients: ``prepare`` and ``score_soft`` raise
    :class:`~nabla_lc.rewards.base.NoGradientError`, and the engine's ``no_gradient_reward`` setting decides.
    """

    def __init__(self, fn: Callable[[str, str], float], policy_tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.fn = fn
        self.policy_tokenizer = policy_tokenizer
        self.skip_special_tokens = skip_special_tokens

    @property
    def differentiable(self) -> bool:
        return False

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        texts = [self.policy_tokenizer.decode(list(r), skip_special_tokens=self.skip_special_tokens) for r in responses]
        values = torch.tensor([float(self.fn(p, t)) for p, t in zip(prompts, texts)], dtype=torch.float32)
        return Scores(values, 0, 0)
