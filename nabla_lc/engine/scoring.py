"""Scoring complete responses: the counting and checks of one request's scores, and the scores of several requests
run in one batched reward pass (∇'s comparisons of concurrent requests)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from ..rewards.base import RewardAdapter, RewardPrefix, Scores, checked_scores
from .accounting import Stats

log = logging.getLogger(__name__)


def counted(reward: RewardAdapter, scores: Scores, count: int, stats: Stats) -> list[float]:
    """One request's rewards of ``count`` responses as floats: the reward passes counted in ``stats``, the values
    checked, a NaN or infinite value warned about and counted."""
    stats.count_reward(scores.passes, scores.tokens)
    values = checked_scores(reward, scores, count)
    nonfinite = sum(not math.isfinite(v) for v in values)
    if nonfinite:
        name = type(reward).__name__
        log.warning("%s gave %d of %d responses a NaN or infinite reward; they rank below every finite one", name, nonfinite, len(values))
        stats.nonfinite_rewards += nonfinite
    return values


@dataclass
class ScoreRequest:
    """Complete responses to one prompt, waiting to be scored by ``reward`` and counted in ``stats``."""

    reward: RewardAdapter
    prompt: str
    responses: list[list[int]]
    stats: Stats
    prefix: RewardPrefix | None = None
    """The reward's prefix of the prompt and the committed tokens every response begins with (∇'s comparisons), or
    None; the reward may encode only what follows it (:meth:`~nabla_lc.rewards.base.RewardAdapter.score_groups`)."""


def run_scores(requests: Sequence[ScoreRequest]) -> list[list[float]]:
    """The rewards of every request, those with the same reward in one call of its
    :meth:`~nabla_lc.rewards.base.RewardAdapter.score_groups` (one batched pass where the adapter can), each counted
    in its own request's stats as if it ran alone."""
    out: list[list[float] | None] = [None] * len(requests)
    by_reward: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        by_reward.setdefault(id(request.reward), []).append(i)
    for indices in by_reward.values():
        reward = requests[indices[0]].reward
        groups = [([requests[i].prompt] * len(requests[i].responses), requests[i].responses) for i in indices]
        found = reward.score_groups(groups, [requests[i].prefix for i in indices])
        for i, scores in zip(indices, found):
            out[i] = counted(reward, scores, len(requests[i].responses), requests[i].stats)
    return out  # type: ignore[return-value]
