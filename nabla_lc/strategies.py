"""Decoding methods as functions over one engine: the same rollout, scoring and accounting code."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Sequence

from .config import NablaConfig
from .engine.accounting import Stats
from .engine.decoder import Decoder
from .engine.rollout import Rollout, Sampling, rollout
from .engine.stream import cut_at_stop
from .engine.types import AnswerExtractor, Request, Result, TokenCallback
from .rewards.base import NoGradientError

if TYPE_CHECKING:
    from .engine.core import Engine

log = logging.getLogger(__name__)

Strategy = Callable[["Engine", Sequence[Request], NablaConfig, "TokenCallback | None", AnswerExtractor], list[Result]]


def greedy(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """One greedy rollout per request, all in one batch."""
    return _sampled(engine, requests, config.replace(temperature=0.0, n=1), on_token, extract, choose=None)


def best_of_n(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the one with the highest reward."""
    return _sampled(engine, requests, config, on_token, extract, choose=_max_reward)


def self_consistency(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the first sample whose answer is the majority answer (no reward needed)."""
    return _sampled(engine, requests, config, on_token, extract, choose=_majority)


def weighted_bon(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """N samples per request; the answer with the largest summed reward, and its best sample."""
    return _sampled(engine, requests, config, on_token, extract, choose=_weighted)


def nabla(engine: "Engine", requests: Sequence[Request], config: NablaConfig, on_token: TokenCallback | None, extract: AnswerExtractor) -> list[Result]:
    """∇-Reasoner: DTO-guided proposals with rejection sampling, one request after another."""
    reward = engine.require_reward("nabla")
    if not reward.differentiable and config.dto_steps > 0 and config.reward_weight > 0:
        if config.no_gradient_reward == "error":
            raise NoGradientError(
                f"{type(reward).__name__} cannot take gradients; set no_gradient_reward='likelihood' to run DTO on the likelihood term alone"
            )
        log.warning("%s cannot take gradients: DTO optimizes the likelihood term alone", type(reward).__name__)
    results = []
    for i, request in enumerate(requests):
        start = time.perf_counter()
        stats = Stats(prompt_tokens=len(request.prompt_ids))
        stream = engine.text_stream(request, config, i, on_token)
        decoder = Decoder(engine.policy, reward, engine.score, config, stats, engine.generator(request, config), stream)
        decoded = decoder.decode(request.prompt_ids, request.reward_prompt, engine.budget(request, config))
        stats.wall_s = time.perf_counter() - start
        results.append(engine.result(stream, decoded.tokens, decoded.finish_reason, stats, decoded.reward, extract, decoded.trace))
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
    return max(range(len(rewards)), key=lambda j: rewards[j])


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
        if a is not None:
            totals[a] += r
    if not totals:
        return _max_reward(answers, rewards)
    winner = max(totals, key=lambda a: totals[a])
    return max((j for j, a in enumerate(answers) if a == winner), key=lambda j: rewards[j])


def _sampled(
    engine: "Engine",
    requests: Sequence[Request],
    config: NablaConfig,
    on_token: TokenCallback | None,
    extract: AnswerExtractor,
    choose: Chooser | None,
) -> list[Result]:
    """Sample n continuations of every request in one batch, then choose one per request."""
    needs_reward = choose in (_max_reward, _weighted)
    reward = engine.require_reward(config.method) if needs_reward else None
    start = time.perf_counter()
    n = config.n
    stats = [Stats(prompt_tokens=len(r.prompt_ids)) for r in requests]
    streams = [engine.text_stream(r, config, i, on_token) for i, r in enumerate(requests)]
    rows = [(i, j) for i in range(len(requests)) for j in range(n)]
    live = n == 1 and choose is None  # why: a single sample is the answer, so it can stream as it is sampled
    samples: list[Rollout] = rollout(
        engine.policy,
        [list(requests[i].prompt_ids) for i, _ in rows],
        Sampling(config.temperature, config.top_p, config.top_k),
        [engine.generator(requests[i], config, sample=j) for i, j in rows],
        [stats[i] for i, _ in rows],
        [engine.budget(requests[i], config) for i, _ in rows],
        [engine.stop(requests[i], config) for i, _ in rows],
        on_token=(lambda row, token: streams[rows[row][0]].push([token])) if live else None,
    )
    results = []
    for i, request in enumerate(requests):
        group = samples[i * n : (i + 1) * n]
        stats[i].rollouts = n
        texts = [cut_at_stop(engine.policy.decode(s.tokens), engine.stop(request, config))[0] for s in group]
        answers = [extract(t) for t in texts]
        rewards = engine.score(request.reward_prompt, [s.tokens for s in group], stats[i]) if reward is not None else None
        chosen = choose(answers, rewards) if choose is not None else 0
        if not live:
            streams[i].push(group[chosen].tokens)
        result = engine.result(streams[i], group[chosen].tokens, group[chosen].finish_reason, stats[i], rewards[chosen] if rewards else None, extract, [])
        result.samples = [
            {"text": t, "answer": a, "reward": (rewards[j] if rewards else None)} for j, (t, a) in enumerate(zip(texts, answers))
        ] if n > 1 else []
        results.append(result)
    for s in stats:  # why: the batch was decoded together, so each request gets an equal share
        s.wall_s = (time.perf_counter() - start) / len(requests)
    return results
