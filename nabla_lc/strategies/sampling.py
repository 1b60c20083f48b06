"""Sample sets: ``n`` independent samples of each request, scored at most once, and the selection of one.

Greedy, Best-of-N, self-consistency and weighted BoN are all "draw, then select": they differ only in
their :class:`~nabla_lc.methods.MethodSpec` (the chooser, whether samples are scored, whether the text
streams live). One set also serves every N up to n (``Engine.sample``/``select``, ``bench --share-samples``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..engine.accounting import Stats
from ..engine.calls import Job, RolloutCall, run_alone
from ..engine.context import DecodingContext
from ..engine.logprobs import position_logprobs
from ..engine.rollout import Rollout, RolloutRow, Sampling
from ..engine.stream import TextStream, cut_at_stop
from ..engine.types import Request, Result
from ..methods import get_method

Steps = Callable[[DecodingContext, Sequence[Request]], "Job[list[Result]]"]
"""A method as a job (:attr:`~nabla_lc.methods.MethodSpec.steps`)."""


def alone(steps: Steps) -> Callable[[DecodingContext, Sequence[Request]], "list[Result]"]:
    """The method's ``run``: its job driven by itself, each rollout call sampled at once."""
    return lambda ctx, requests: run_alone(ctx.policy, steps(ctx, requests))


@dataclass
class SampleSet:
    """n sampled responses to one request, scored at most once; BoN, SC and weighted BoN select from its first N."""

    request: Request
    samples: list[Rollout]
    texts: list[str]
    answers: list[str | None]
    rewards: list[float] | None
    """Every sample's reward, or None when the set was drawn without scoring."""
    stats: list[Stats]
    """Per sample: the policy passes of its rollout, and an equal share of the batched reward pass."""
    sample_s: float
    """Wall time of the sampling, this request's equal share of the batch."""
    score_s: float
    """Wall time of the scoring, this request's equal share of the batch."""


def draw(
    ctx: DecodingContext,
    requests: Sequence[Request],
    scored: bool,
    on_token: Callable[[int, int], None] | None = None,
) -> list[SampleSet]:
    """:func:`draw_steps` driven by itself."""
    return run_alone(ctx.policy, draw_steps(ctx, requests, scored, on_token))


def draw_steps(
    ctx: DecodingContext,
    requests: Sequence[Request],
    scored: bool,
    on_token: Callable[[int, int], None] | None = None,
) -> Job[list[SampleSet]]:
    """As a job: sample ``config.n`` continuations of every request in one call; score each group in one pass when ``scored``.

    Sample ``j`` of a request uses the generator of (seed, prompt, j), so the first N samples of a
    set of n are exactly the samples of a run with N. ``on_token(row, token)`` sees every sampled token.
    """
    config = ctx.config
    reward = ctx.require_reward(config.method) if scored else None
    n = config.n
    start = time.perf_counter()
    rows = [
        RolloutRow(
            list(request.prompt_ids), [], ctx.budget(request), ctx.stop(request), ctx.generator(request, sample=j), Stats(), ctx.grammar(request)
        )
        for request in requests
        for j in range(n)
    ]
    keep_logits = any(request.logprobs is not None for request in requests)  # why: the logits only a logprobs request needs
    samples: list[Rollout] = yield RolloutCall(rows, Sampling(config.temperature, config.top_p, config.top_k), keep_logits, on_token)
    sampled = time.perf_counter()
    sets = []
    for i, request in enumerate(requests):
        group, group_stats = samples[i * n : (i + 1) * n], [row.stats for row in rows[i * n : (i + 1) * n]]
        texts = [cut_at_stop(ctx.policy.decode(s.tokens), ctx.stop(request))[0] for s in group]
        rewards = None
        if reward is not None:
            batch = Stats()
            rewards = ctx.score(request.reward_prompt, [s.tokens for s in group], batch)
            _share_reward(batch, group_stats)
            for sample_stats, value in zip(group_stats, rewards):  # why: a selection at N < n counts only its own samples
                sample_stats.nonfinite_rewards += not math.isfinite(value)
        sets.append(SampleSet(request, group, texts, [ctx.extract(t) for t in texts], rewards, group_stats, 0.0, 0.0))
    done = time.perf_counter()
    for sample_set in sets:
        sample_set.sample_s = (sampled - start) / len(requests)
        sample_set.score_s = (done - sampled) / len(requests)
    return sets


def select(ctx: DecodingContext, sample_set: SampleSet, stream: TextStream | None = None) -> Result:
    """The ``config.method`` result at N = ``config.n`` from the set's first N samples, with their statistics.

    Wall time is the set's sampling (and, for scored methods, scoring) time times N / n: exact at N = n.
    """
    config = ctx.config
    n, drawn = config.n, len(sample_set.samples)
    if not 1 <= n <= drawn:
        raise ValueError(f"cannot select N={n} from a set of {drawn} samples")
    spec = get_method(config.method)
    assert spec.chooser is not None
    scored = spec.needs_reward
    if scored and sample_set.rewards is None:
        raise ValueError(f"method {config.method!r} needs a scored sample set")
    rewards = sample_set.rewards[:n] if scored and sample_set.rewards is not None else None
    chosen = spec.chooser(sample_set.answers[:n], rewards)
    stats = Stats(prompt_tokens=len(sample_set.request.prompt_ids), rollouts=n)
    for sample_stats in sample_set.stats[:n]:
        stats.add(sample_stats if scored else dataclasses.replace(sample_stats, reward_forward=0, reward_backward=0, reward_tokens=0))
    stats.wall_s = (sample_set.sample_s + (sample_set.score_s if scored else 0.0)) * n / drawn
    if stream is None:
        stream = ctx.text_stream(sample_set.request, 0)
    best = sample_set.samples[chosen]
    if not stream.ids:  # not streamed live as it was sampled
        stream.push(best.tokens)
    result = ctx.result(stream, best.tokens, best.finish_reason, stats, rewards[chosen] if rewards else None, [])
    top = sample_set.request.logprobs
    if top is not None:
        if best.logits is None:
            raise ValueError("the sample set was drawn without logits; draw it from requests that ask for logprobs")
        result.logprobs = position_logprobs(ctx.policy, best.logits, best.tokens, top)
    if n > 1:
        result.samples = [
            {"text": t, "answer": a, "reward": rewards[j] if rewards else None}
            for j, (t, a) in enumerate(zip(sample_set.texts[:n], sample_set.answers[:n]))
        ]
    return result


def _share_reward(batch: Stats, stats: Sequence[Stats]) -> None:
    """Split a batched reward pass's counts evenly over the samples (any remainder to the first)."""
    for name in ("reward_forward", "reward_backward", "reward_tokens"):
        total = getattr(batch, name)
        for j, sample_stats in enumerate(stats):
            setattr(sample_stats, name, getattr(sample_stats, name) + total // len(stats) + (total % len(stats) if j == 0 else 0))


def draw_and_select(ctx: DecodingContext, requests: Sequence[Request]) -> list[Result]:
    """Draw ``config.n`` samples of every request in one batch, then select one per request (the methods' ``run``)."""
    return run_alone(ctx.policy, draw_and_select_steps(ctx, requests))


def draw_and_select_steps(ctx: DecodingContext, requests: Sequence[Request]) -> Job[list[Result]]:
    """:func:`draw_and_select` as a job (the methods' ``steps``)."""
    streams = [ctx.text_stream(r, i) for i, r in enumerate(requests)]
    n = ctx.config.n
    spec = get_method(ctx.config.method)
    sets = yield from draw_steps(
        ctx,
        requests,
        scored=spec.needs_reward,
        on_token=(lambda row, token: streams[row // n].push([token])) if spec.streams_live else None,
    )
    return [select(ctx, sample_set, stream) for sample_set, stream in zip(sets, streams)]
