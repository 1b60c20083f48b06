"""Self-consistency: N samples per request; the first sample whose answer is the majority answer (no reward)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ..methods import MethodSpec
from .sampling import draw_and_select, draw_and_select_steps


def majority(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        if a is not None:
            counts[a] += 1
    if not counts:
        return 0
    best = max(counts.values())
    return next(j for j, a in enumerate(answers) if a is not None and counts[a] == best)


SPEC = MethodSpec("sc", draw_and_select, steps=draw_and_select_steps, needs_reward=False, chooser=majority, shares_samples=True, constrained=True, logprobs=True)
