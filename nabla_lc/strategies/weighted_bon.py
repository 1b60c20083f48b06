"""Weighted Best-of-N: N samples per request; the answer with the largest summed reward, and its best sample."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

from ..methods import MethodSpec
from ..rewards.base import rank
from .bon import max_reward
from .sampling import draw_and_select, draw_and_select_steps


def weighted(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    assert rewards is not None
    totals: dict[str, float] = defaultdict(float)
    for a, r in zip(answers, rewards):
        if a is not None and math.isfinite(r):  # why: one NaN or inf would decide (or poison) its answer's total
            totals[a] += r
    if not totals:
        return max_reward(answers, rewards)
    winner = max(totals, key=lambda a: totals[a])
    return max((j for j, a in enumerate(answers) if a == winner), key=lambda j: rank(rewards[j]))


SPEC = MethodSpec("weighted_bon", draw_and_select, steps=draw_and_select_steps, needs_reward=True, chooser=weighted, shares_samples=True, constrained=True, logprobs=True)
