"""∇-Reasoner: DTO-guided proposals with rejection sampling; the requests' rollouts decode in batches."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from ..engine.accounting import Stats
from ..engine.calls import Job, gather
from ..engine.context import DecodingContext
from ..engine.decoder import Decoder
from ..engine.rollout import Sampling
from ..engine.types import Request, Result
from ..methods import MethodSpec
from ..rewards.base import NoGradientError
from .sampling import alone

log = logging.getLogger(__name__)


def nabla_steps(ctx: DecodingContext, requests: Sequence[Request]) -> Job[list[Result]]:
    """∇-Reasoner as a job: DTO-guided proposals with rejection sampling; the requests' rollouts decode in batches."""
    config = ctx.config
    reward = ctx.require_reward("nabla")
    if not reward.differentiable and config.dto_steps > 0 and config.reward_weight > 0:
        if config.no_gradient_reward == "error":
            raise NoGradientError(
                f"{type(reward).__name__} cannot take gradients; set no_gradient_reward='likelihood' to run DTO on the likelihood term alone"
            )
        log.warning("%s cannot take gradients: DTO optimizes the likelihood term alone", type(reward).__name__)
    start = time.perf_counter()
    stats = [Stats(prompt_tokens=len(r.prompt_ids)) for r in requests]
    streams = [ctx.text_stream(r, i) for i, r in enumerate(requests)]
    decodings = [
        Decoder(ctx.policy, reward, config, s, ctx.generator(r), stream, ctx.grammar(r)).steps(
            r.prompt_ids, r.reward_prompt, ctx.budget(r)
        )
        for r, s, stream in zip(requests, stats, streams)
    ]
    decoded = yield from gather(decodings, Sampling(config.temperature, config.top_p, config.top_k))
    wall_s = (time.perf_counter() - start) / len(requests)  # why: the batch's time, shared equally
    results = []
    for s, stream, d in zip(stats, streams, decoded):
        s.wall_s = wall_s
        results.append(ctx.result(stream, d.tokens, d.finish_reason, s, d.reward, d.trace))
    return results


SPEC = MethodSpec("nabla", alone(nabla_steps), needs_reward=True, steps=nabla_steps, constrained=True, dto_passes=True)
