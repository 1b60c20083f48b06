"""Decoding methods as functions over one engine: the same rollout, scoring and accounting code."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .config import NablaConfig
from .engine.accounting import Stats
from .engine.decoder import Decoder, decode_together
from .engine.rollout import Rollout, Sampling, rollout
from .engine.stream import cut_at_stop
from .engine.types import AnswerExtractor, Request, Result, TokenCallback
from .rewards.base import NoGradientError, rank

if TYPE_CHECKING:
    from .engine.core import Engine
    from .engine.stream import TextStream

log = logging.getLogger(__name__)

Strategy = Callable[["Engine", Sequence[Request], NablaConfig, "TokenCallback | None", AnswerExtractor], list[Result]]


def greedy(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """One greedy rollout per request, all in one batch."""
    return _sampled(engine, requests, config.replace(temperature=0.0, n=1), on_token, extract)


def best_of_n(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the one with the highest reward."""
    return _sampled(engine, requests, config, on_token, extract)


def self_consistency(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the first sample whose answer is the majority answer (no reward needed)."""
    return _sampled(engine, requests, config, on_token, extract)


def weighted_bon(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the answer with the largest summed reward, and its best sample."""
    return _sampled(engine, requests, config, on_token, extract)


def nabla(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """∇-Reasoner: DTO-guided proposals with rejection sampling; the requests' rollouts decode in batches."""
    reward = engine.require_reward("nabla")
    if not reward.differentiable and config.dto_steps > 0 and config.reward_weight > 0:
        if config.no_gradient_reward == "error":
            raise NoGradientError(
                f"{type(reward).__name__} cannot take gradients; set no_gradient_reward='likelihood' to run DTO on the likelihood term alone"
            )
        log.warning("%s cannot take gradients: DTO optimizes the likelihood term alone", type(reward).__name__)
    start = time.perf_counter()
    stats = [Stats(prompt_tokens=len(r.prompt_ids)) for r in requests]
    streams = [engine.text_stream(r, config, i, on_token) for i, r in enumerate(requests)]
    decodings = [
        Decoder(engine.policy, reward, engine.score, config, s, engine.generator(r, config), stream).steps(
            r.prompt_ids, r.reward_prompt, engine.budget(r, config)
        )
        for r, s, stream in zip(requests, stats, streams)
    ]
    decoded = decode_together(engine.policy, Sampling(config.temperature, config.top_p, config.top_k), decodings)
    wall_s = (time.perf_counter() - start) / len(requests)  # why: the batch's time, shared equally
    results = []
    for s, stream, d in zip(stats, streams, decoded):
        s.wall_s = wall_s
        results.append(engine.result(stream, d.tokens, d.finish_reason, s, d.reward, extract, d.trace))
    return results


STRATEGIES: dict[str, Strategy] = {
    "greedy": greedy,
    "bon": best_of_n,
    "sc": self_consistency,
    "weighted_bon": weighted_bon,
    "nabla": nabla,
}

Chooser = Callable[[list[str | None], list[float] | None], int]


def _max_reward(answers: list[str | None], rewards: list[float] | None) -> int:
    assert rewards is not None
    return max(range(len(rewards)), key=lambda j: rank(rewards[j]))


def _majority(answers: list[str | None], rewards: list[float] | None) -> int:
    counts: dict[str, int] = defaultdict(int)
    for a in answers:
        if a is not None:
            counts[a] += 1
    if not counts:
        return 0
    best = max(counts.values())
    return next(j for j, a in enumerate(answers) if a is not None and counts[a] == best)


def _weighted(answers: list[str | None], rewards: list[float] | None) -> int:
    assert rewards is not None
    totals: dict[str, float] = defaultdict(float)
    for a, r in zip(answers, rewards):
        if a is not None and math.isfinite(r):  # why: one NaN or inf would decide (or poison) its answer's total
            totals[a] += r
    if not totals:
        return _max_reward(answers, rewards)
    winner = max(totals, key=lambda a: totals[a])
    return max((j for j, a in enumerate(answers) if a == winner), key=lambda j: rank(rewards[j]))


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


CHOOSERS: dict[str, Chooser | None] = {"greedy": None, "bon": _max_reward, "sc": _majority, "weighted_bon": _weighted}
"""The sampling methods and how each picks one of its N samples (greedy: the only one)."""
SCORED = ("bon", "weighted_bon")
"""Sampling methods that need every sample's reward."""


def draw(
    engine: "Engine",
    requests: Sequence[Request],
    config: NablaConfig,
    extract: AnswerExtractor,
    scored: bool,
    on_token: Callable[[int, int], None] | None = None,
) -> list[SampleSet]:
    """Sample ``config.n`` continuations of every request in one batch; score each group in one pass when ``scored``.

    Sample ``j`` of a request uses the generator of (seed, prompt, j), so the first N samples of a
    set of n are exactly the samples of a run with N. ``on_token(row, token)`` sees every sampled token.
    """
    reward = engine.require_reward(config.method) if scored else None
    n = config.n
    start = time.perf_counter()
    rows = [(i, j) for i in range(len(requests)) for j in range(n)]
    stats = [Stats() for _ in rows]
    samples: list[Rollout] = rollout(
        engine.policy,
        [list(requests[i].prompt_ids) for i, _ in rows],
        Sampling(config.temperature, config.top_p, config.top_k),
        [engine.generator(requests[i], config, sample=j) for i, j in rows],
        stats,
        [engine.budget(requests[i], config) for i, _ in rows],
        [engine.stop(requests[i], config) for i, _ in rows],
        on_token=on_token,
    )
    sampled = time.perf_counter()
    sets = []
    for i, request in enumerate(requests):
        group, group_stats = samples[i * n : (i + 1) * n], stats[i * n : (i + 1) * n]
        texts = [cut_at_stop(engine.policy.decode(s.tokens), engine.stop(request, config))[0] for s in group]
        rewards = None
        if reward is not None:
            batch = Stats()
            rewards = engine.score(request.reward_prompt, [s.tokens for s in group], batch)
            _share_reward(batch, group_stats)
            for sample_stats, value in zip(group_stats, rewards):  # why: a selection at N < n counts only its own samples
                sample_stats.nonfinite_rewards += not math.isfinite(value)
        sets.append(SampleSet(request, group, texts, [extract(t) for t in texts], rewards, group_stats, 0.0, 0.0))
    done = time.perf_counter()
    for sample_set in sets:
        sample_set.sample_s = (sampled - start) / len(requests)
        sample_set.score_s = (done - sampled) / len(requests)
    return sets


def select(engine: "Engine", sample_set: SampleSet, config: NablaConfig, extract: AnswerExtractor, stream: "TextStream | None" = None) -> Result:
    """The ``config.method`` result at N = ``config.n`` from the set's first N samples, with their statistics.

    Wall time is the set's sampling (and, for scored methods, scoring) time times N / n: exact at N = n.
    """
    n, drawn = config.n, len(sample_set.samples)
    if not 1 <= n <= drawn:
        raise ValueError(f"cannot select N={n} from a set of {drawn} samples")
    choose = CHOOSERS[config.method]
    scored = config.method in SCORED
    if scored and sample_set.rewards is None:
        raise ValueError(f"method {config.method!r} needs a scored sample set")
    rewards = sample_set.rewards[:n] if scored and sample_set.rewards is not None else None
    chosen = choose(sample_set.answers[:n], rewards) if choose is not None else 0
    stats = Stats(prompt_tokens=len(sample_set.request.prompt_ids), rollouts=n)
    for sample_stats in sample_set.stats[:n]:
        stats.add(sample_stats if scored else dataclasses.replace(sample_stats, reward_forward=0, reward_backward=0, reward_tokens=0))
    stats.wall_s = (sample_set.sample_s + (sample_set.score_s if scored else 0.0)) * n / drawn
    if stream is None:
        stream = engine.text_stream(sample_set.request, config, 0, None)
    best = sample_set.samples[chosen]
    if not stream.ids:  # not streamed live as it was sampled
        stream.push(best.tokens)
    result = engine.result(stream, best.tokens, best.finish_reason, stats, rewards[chosen] if rewards else None, extract, [])
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


def _sampled(
    engine: "Engine",
    requests: Sequence[Request],
    config: NablaConfig,
    on_token: TokenCallback | None,
    extract: AnswerExtractor,
) -> list[Result]:
    """Draw ``config.n`` samples of every request in one batch, then select one per request."""
    streams = [engine.text_stream(r, config, i, on_token) for i, r in enumerate(requests)]
    n = config.n
    live = CHOOSERS[config.method] is None  # why: a single sample is the answer, so it can stream as it is sampled
    sets = draw(
        engine,
        requests,
        config,
        extract,
        scored=config.method in SCORED,
        on_token=(lambda row, token: streams[row // n].push([token])) if live else None,
    )
    return [select(engine, sample_set, config, extract, stream) for sample_set, stream in zip(sets, streams)]
