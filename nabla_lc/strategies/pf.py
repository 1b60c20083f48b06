"""Particle filtering over reasoning steps (Puri et al. 2025, arXiv 2502.01618; as in its_hub's ``ParticleFiltering``).

N particles; at each step every unfinished particle is extended by one step and weighted by the reward of its
partial response (finished particles keep their final reward); then N particles are drawn with replacement with
probabilities softmax(reward / ``resample_temperature``). Finished particles are never extended; one that the
resampling drops is kept as a candidate answer. The search ends when every particle has finished.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..engine.calls import Job
from ..engine.context import DecodingContext
from ..engine.types import Request, Result
from ..methods import MethodSpec
from .sampling import alone
from .steps import Search, log_weights, run_search


def resample(ctx: DecodingContext, search: Search) -> None:
    """Move the particles to done when all have finished; else draw ``n`` of them by their weights."""
    particles = search.live
    if all(p.finished for p in particles):
        search.done.extend(particles)
        search.live = []
        return
    probs = log_weights(ctx, particles).softmax(0)  # [N]
    drawn = torch.multinomial(probs, len(particles), replacement=True, generator=search.choice).tolist()
    kept = set(drawn)
    search.done.extend(p for j, p in enumerate(particles) if p.finished and j not in kept)
    search.live = [particles[j].copy() for j in drawn]


def particle_filtering(ctx: DecodingContext, requests: Sequence[Request]) -> Job[list[Result]]:
    """Particle filtering with ``config.n`` particles per request, all requests' steps in one batch."""
    return run_search(ctx, requests, ctx.config.n, resample)


SPEC = MethodSpec("pf", alone(particle_filtering), needs_reward=True, steps=particle_filtering)
