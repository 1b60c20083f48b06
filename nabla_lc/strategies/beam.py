"""Reward-guided beam search over reasoning steps, and DVTS (search-and-learn's ``beam_search`` and ``dvts``).

Beam search: at each step the n candidates are scored by the reward of their partial responses and the M
(``beam_width``) best are kept; a finished one among them is a candidate answer, each unfinished one is extended
n / M times at the next step. DVTS (``dvts=True``): M independent subtrees of n / M extensions each, every
subtree keeping its own best. Both start from n extensions of the empty response.
"""

from __future__ import annotations

from typing import Sequence

from ..engine.calls import Job
from ..engine.context import DecodingContext
from ..engine.types import Request, Result
from ..methods import MethodSpec
from ..rewards.base import rank
from .sampling import alone
from .steps import Candidate, Search, run_search


def best(candidates: Sequence[Candidate], m: int) -> list[int]:
    """Indices of the ``m`` highest-reward candidates (ties: the earlier one; NaN ranks lowest)."""
    return sorted(range(len(candidates)), key=lambda j: (-rank(candidates[j].reward), j))[:m]


def width(ctx: DecodingContext) -> int:
    """M: the beams kept (at most n)."""
    return min(ctx.config.beam_width, ctx.config.n)


def advance(ctx: DecodingContext, search: Search) -> None:
    """Keep the M best candidates (or each subtree's best, for DVTS); the unfinished ones are extended n / M times."""
    m = width(ctx)
    k = ctx.config.n // m  # extensions per kept candidate
    if ctx.config.dvts:  # why: live is laid out as whole subtrees of k candidates, in order
        groups = [search.live[i : i + k] for i in range(0, len(search.live), k)]
        kept = [group[best(group, 1)[0]] for group in groups]
    else:
        kept = [search.live[j] for j in best(search.live, m)]
    search.done.extend(c for c in kept if c.finished)
    search.live = [c.copy() for c in kept if not c.finished for _ in range(k)]


def beam_search(ctx: DecodingContext, requests: Sequence[Request]) -> Job[list[Result]]:
    """Beam search (or DVTS) with ``config.n`` candidates per step and ``beam_width`` beams, all requests in one batch."""
    return run_search(ctx, requests, ctx.config.n, advance)


SPEC = MethodSpec("beam", alone(beam_search), needs_reward=True, steps=beam_search)
