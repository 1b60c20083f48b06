"""Per-position record of a ∇-Reasoner request."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PositionRecord:
    """What happened at one position that reached a probe (optimized or skipped by gradient)."""

    index: int
    """Response position (0 = first response token)."""
    original_token: int
    """The current rollout's token at the position."""
    original_text: str
    entropy: float
    """Entropy (nats) of the policy's next-token distribution at the position."""
    grad_norm: float
    """Probe gradient norm ‖∂L/∂z‖ at the position, on the authors' loss scale."""
    probe_reused: bool = False
    """Whether the probe reused an earlier probe's pass on the same response (no model pass)."""
    optimized: bool = False
    """Whether DTO ran (the gradient norm exceeded ε_grad)."""
    steps: int = 0
    """DTO steps taken."""
    cache_hits: int = 0
    """DTO steps that reused a cached gradient."""
    loss_start: float | None = None
    loss_end: float | None = None
    kl: float | None = None
    """KL(softmax(z̃/τ) ‖ softmax(z/τ)) that DTO moved the position's distribution."""
    top_after: list[tuple[str, float]] = field(default_factory=list)
    """The most likely tokens of softmax(z̃/τ) after DTO, with their probabilities."""
    proposed_token: int | None = None
    """The resampled token when it differs from the original (a proposal)."""
    proposed_text: str | None = None
    reward_current: float | None = None
    """Reward of the current full continuation at the comparison."""
    reward_proposal: float | None = None
    """Reward of the proposal's full continuation."""
    accepted: bool | None = None
    """Whether the proposal was kept (strictly higher reward)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
