"""Step-level search: partial responses extended one reasoning step at a time and scored, shared by ``pf`` and ``beam``.

A step is one rollout row that stops at the step separator (``NablaConfig.step_separator``) or after
``NablaConfig.step_tokens`` tokens. Every step of every live candidate of every request is one rollout call (the
search is a :data:`~nabla_lc.engine.calls.Job`, so the scheduler batches it with other requests' rows); each request's new steps are scored in one batched reward pass
(:meth:`~nabla_lc.rewards.base.RewardAdapter.score_partial` while unfinished, ``score`` once finished).
Accounting: ``Stats.rollouts`` counts step rollouts, each scored once, so ``reward_forward == rollouts``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import torch

from ..engine.accounting import Stats
from ..engine.calls import Job, RolloutCall
from ..engine.context import DecodingContext
from ..engine.rollout import Rollout, RolloutRow, Sampling
from ..engine.stream import cut_at_stop
from ..engine.types import Request, Result
from ..rewards.base import rank
from .bon import max_reward
from .weighted_bon import weighted

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A partial (or finished) response of one request."""

    tokens: list[int] = field(default_factory=list)
    reward: float = -math.inf
    """The reward of :attr:`tokens` (partial until finished); -inf before the first step."""
    finish_reason: str | None = None
    """None while it can be extended; then ``eos``, ``stop`` (a request stop string) or ``length``."""
    steps: int = 0
    """Steps taken."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def copy(self) -> "Candidate":
        return dataclasses.replace(self, tokens=list(self.tokens))


@dataclass
class Search:
    """One request's state in a step-level search."""

    request: Request
    index: int
    """The request's index in the call (its text stream's)."""
    stats: Stats
    generators: list[torch.Generator | None]
    """One per candidate slot, seeded by (seed, prompt, slot): slot j's steps are reproducible in any batch."""
    choice: torch.Generator | None
    """The generator of the method's own draws (resampling), seeded apart from every slot."""
    live: list[Candidate]
    """The candidates the next step extends (finished ones may stay in, as particle filtering keeps them)."""
    done: list[Candidate] = field(default_factory=list)
    """Finished candidates the answer is chosen from."""


SLOT_CHOICE = -1
"""The generator index of a search's own draws (slots are 0..n-1)."""


def start(ctx: DecodingContext, requests: Sequence[Request], live: int) -> list[Search]:
    """A search per request with ``live`` empty candidates and ``ctx.config.n`` seeded slots."""
    n = ctx.config.n
    return [
        Search(
            request,
            i,
            Stats(prompt_tokens=len(request.prompt_ids)),
            [ctx.generator(request, sample=j) for j in range(n)],
            ctx.generator(request, sample=SLOT_CHOICE, device="cpu"),  # why: it draws over rewards, on the host
            [Candidate() for _ in range(live)],
        )
        for i, request in enumerate(requests)
    ]


def extend(ctx: DecodingContext, searches: Sequence[Search]) -> Generator[RolloutCall, "list[Rollout]", None]:
    """Extend every unfinished live candidate of every search by one step (one rollout call) and score the new steps.

    The candidate in slot j of a search samples with its generator j. Scores: one batched reward pass per search.
    """
    config = ctx.config
    rows: list[RolloutRow] = []
    owners: list[tuple[Search, Candidate]] = []
    for search in searches:
        total = ctx.budget(search.request)
        separator = (config.step_separator,) if config.step_separator else ()
        for slot, cand in enumerate(search.live):
            if cand.finished:
                continue
            left = total - len(cand.tokens)
            budget = min(left, config.step_tokens) if config.step_tokens > 0 else left
            # why: the request's stop strings are looked for across the earlier steps (one may straddle a step
            # boundary); the separator in this step only, so the separators of earlier steps do not end it at once
            prefix = [*search.request.prompt_ids, *cand.tokens]
            rows.append(RolloutRow(prefix, list(cand.tokens), budget, ctx.stop(search.request), search.generators[slot], search.stats, own_stop=separator))
            owners.append((search, cand))
    if not rows:
        return
    steps = yield RolloutCall(rows, Sampling(config.temperature, config.top_p, config.top_k))
    for (search, cand), step in zip(owners, steps):
        search.stats.rollouts += 1
        cand.tokens.extend(step.tokens)
        cand.steps += 1
        stops = ctx.stop(search.request)
        if step.finish_reason == "eos":
            cand.finish_reason = "eos"
        elif step.finish_reason == "stop" and stops and cut_at_stop(ctx.policy.decode(cand.tokens), stops)[1]:
            cand.finish_reason = "stop"
        elif len(cand.tokens) >= ctx.budget(search.request):
            cand.finish_reason = "length"
    for search in searches:
        fresh = [cand for s, cand in owners if s is search]
        for partial in (False, True):  # why: a finished response gets its full score, an unfinished one the partial score
            group = [c for c in fresh if c.finished != partial]
            if group:
                values = ctx.score(search.request.reward_prompt, [c.tokens for c in group], search.stats, partial=partial)
                for cand, value in zip(group, values):
                    cand.reward = value


def log_weights(ctx: DecodingContext, candidates: Sequence[Candidate]) -> torch.Tensor:
    """rank(reward) / resample_temperature per candidate ([K]); all -inf (no finite reward) becomes uniform."""
    w = torch.tensor([rank(c.reward) for c in candidates], dtype=torch.float64) / ctx.config.resample_temperature
    return w if torch.isfinite(w).any() else torch.zeros_like(w)


def answer(ctx: DecodingContext, candidates: Sequence[Candidate], answers: Sequence[str | None]) -> int:
    """The index of the returned candidate: ``best`` reward, or ``weighted_majority`` of softmax(log weights)."""
    rewards = [c.reward for c in candidates]
    if ctx.config.search_answer == "best":
        return max_reward(answers, rewards)
    return weighted(answers, log_weights(ctx, candidates).softmax(0).tolist())


def results(ctx: DecodingContext, searches: Sequence[Search], wall_s: float) -> list[Result]:
    """One result per search: its chosen finished candidate, and every finished candidate as ``samples``."""
    out = []
    for search in searches:
        pool = search.done
        texts = [cut_at_stop(ctx.policy.decode(c.tokens), ctx.stop(search.request))[0] for c in pool]
        answers = [ctx.extract(t) for t in texts]
        chosen = pool[answer(ctx, pool, answers)]
        search.stats.wall_s = wall_s
        stream = ctx.text_stream(search.request, search.index)
        stream.push(chosen.tokens)
        result = ctx.result(stream, chosen.tokens, chosen.finish_reason or "length", search.stats, chosen.reward, [])
        result.samples = [
            {"text": t, "answer": a, "reward": c.reward, "steps": c.steps, "tokens": len(c.tokens)}
            for t, a, c in zip(texts, answers, pool)
        ]
        out.append(result)
    return out


def run_search(
    ctx: DecodingContext, requests: Sequence[Request], live: int, advance: Callable[[DecodingContext, Search], None]
) -> Job[list[Result]]:
    """As a job: start a search per request with ``live`` candidates; extend and ``advance`` (select) until none is
    live. Each step's rollouts are one call, so the engine's scheduler batches them with other requests', and a
    cancelled search stops at the next token (and takes no further step).

    A process reward that sums its step scores is used, with a warning: its rewards grow with the number of steps,
    so candidates with different step counts (a finished one against unfinished ones, steps cut by ``step_tokens``)
    are not compared on their quality."""
    reward = ctx.require_reward(ctx.config.method)
    if reward.kind == "process" and getattr(reward, "aggregation", None) == "sum":
        log.warning(
            "%s sums its step scores, so %s compares candidates of different step counts unfairly; "
            "build it with aggregation='last', 'min' or 'mean' for step-level search",
            reward.identity,
            ctx.config.method,
        )
    began = time.perf_counter()
    searches = start(ctx, requests, live)
    active = list(searches)
    while active:
        yield from extend(ctx, active)
        for search in active:
            advance(ctx, search)
        active = [s for s in active if s.live]
    return results(ctx, searches, (time.perf_counter() - began) / len(requests))  # why: the batch's time, shared equally
