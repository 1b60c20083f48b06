"""Greedy decoding: one argmax rollout per request, streamed as it is sampled."""

from __future__ import annotations

from typing import Sequence

from ..engine.calls import Job
from ..engine.context import DecodingContext
from ..engine.types import Request, Result
from ..methods import MethodSpec
from .sampling import alone, draw_and_select_steps


def greedy(ctx: DecodingContext, requests: Sequence[Request]) -> Job[list[Result]]:
    """As a job: one greedy rollout per request, all in one batch."""
    return draw_and_select_steps(ctx.with_config(ctx.config.ran()), requests)


def only_sample(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    return 0


SPEC = MethodSpec(
    "greedy", alone(greedy), needs_reward=False, steps=greedy, chooser=only_sample, streams_live=True, runs_once=True, constrained=True, logprobs=True,
    fixed=(("temperature", 0.0), ("n", 1)),
)
