"""Greedy decoding: one argmax rollout per request, streamed as it is sampled."""

from __future__ import annotations

from typing import Sequence

from ..engine.context import DecodingContext
from ..engine.types import Request, Result
from ..methods import MethodSpec
from .sampling import draw_and_select


def greedy(ctx: DecodingContext, requests: Sequence[Request]) -> list[Result]:
    """One greedy rollout per request, all in one batch."""
    return draw_and_select(ctx.with_config(ctx.config.replace(temperature=0.0, n=1)), requests)


def only_sample(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    return 0


SPEC = MethodSpec("greedy", greedy, needs_reward=False, chooser=only_sample, streams_live=True, runs_once=True, constrained=True)
