"""Best-of-N: N samples per request; the one with the highest reward."""

from __future__ import annotations

from typing import Sequence

from ..methods import MethodSpec
from ..rewards.base import rank
from .sampling import draw_and_select, draw_and_select_steps


def max_reward(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    assert rewards is not None
    return max(range(len(rewards)), key=lambda j: rank(rewards[j]))


SPEC = MethodSpec("bon", draw_and_select, steps=draw_and_select_steps, needs_reward=True, chooser=max_reward, shares_samples=True, constrained=True, logprobs=True)
