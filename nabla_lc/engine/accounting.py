"""Counting model calls, tokens and decoder events for one request.

Two totals are always reported:

* ``model_calls`` (complete): every forward and every backward pass of the policy and of the
  reward model, prefix encodings, probes and rejection scoring included. A batched pass over
  B sequences counts B; one autoregressive decoding step of B sequences counts B.
* ``model_calls_paper`` (the authors' rule): +1 per autoregressive rollout token, +4 per
  uncached DTO step (a probe that runs a pass counts as one), +2 per rejection comparison.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class Stats:
    """Counters of one request. Every field is a plain number, so results serialize as JSON."""

    policy_forward: int = 0
    """Policy forward passes (per sequence)."""
    policy_backward: int = 0
    """Policy backward passes."""
    reward_forward: int = 0
    """Reward-model forward passes (per sequence)."""
    reward_backward: int = 0
    """Reward-model backward passes."""
    policy_tokens: int = 0
    """Tokens processed by the policy, forward and backward counted separately."""
    reward_tokens: int = 0
    """Tokens processed by the reward model, forward and backward counted separately."""
    rollouts: int = 0
    """Sampled continuations, the first included (for step-level search, ``pf`` and ``beam``: step rollouts)."""
    rollout_tokens: int = 0
    """Tokens sampled autoregressively over all rollouts."""
    dto_runs: int = 0
    """DTO runs (optimizations of one rollout's logits)."""
    dto_steps: int = 0
    """Gradient steps inside DTO runs."""
    cache_hits: int = 0
    """DTO steps that reused a cached dL/dy (no model pass)."""
    probes: int = 0
    """Gradient-norm checks that decided whether a position gets DTO."""
    probes_reused: int = 0
    """Probes answered by an earlier probe's pass on the same response (no model pass)."""
    proposals: int = 0
    """Resampled tokens that differed from the rollout's."""
    rejections: int = 0
    """Proposals whose continuation did not score strictly higher."""
    skipped_entropy: int = 0
    """Positions committed without a probe because their entropy was at most ε_ent."""
    skipped_gradient: int = 0
    """Positions committed after a probe because their gradient norm was at most ε_grad."""
    skipped_differ: int = 0
    """Positions committed without a probe because a resample would almost surely repeat the rollout's token."""
    nonfinite_gradients: int = 0
    """Probes or DTO runs abandoned because a gradient was NaN or infinite (the rollout's token is kept)."""
    nonfinite_rewards: int = 0
    """Scored responses whose reward was NaN or infinite (ranked below every finite reward, with a warning)."""
    positions: int = 0
    """Positions the decoder committed, one token each, before finishing without search."""
    response_tokens: int = 0
    """Tokens in the final response."""
    prompt_tokens: int = 0
    """Tokens in the templated prompt."""
    wall_s: float = 0.0
    """Wall time of the request in seconds (a batch's wall time divided by its size for batched methods)."""

    @property
    def model_calls(self) -> int:
        """Complete count: every forward and backward pass of both models."""
        return self.policy_forward + self.policy_backward + self.reward_forward + self.reward_backward

    @property
    def model_calls_paper(self) -> int:
        """The authors' rule: +1 per rollout token, +4 per uncached DTO step, +2 per comparison."""
        uncached_steps = self.dto_steps - self.cache_hits + self.probes - self.probes_reused
        return self.rollout_tokens + 4 * uncached_steps + 2 * self.proposals

    @property
    def rejection_rate(self) -> float:
        """Rejections per proposal (0 when there was none)."""
        return self.rejections / self.proposals if self.proposals else 0.0

    @property
    def rejection_rate_generations(self) -> float:
        """The paper's rejection rate of one ∇ request: rejections per generation, its first rollout and each
        proposal (the authors' ``n_rejections / n_generations``); 0 before any rollout.

        For i.i.d. proposals at N_max = N it is 1 − H_N/N (66.0% at N = 8), where :attr:`rejection_rate` is
        (N − H_N)/(N − 1) (75.5%).
        """
        return self.rejections / (self.proposals + 1) if self.rollouts else 0.0

    def count_policy(self, passes: int, tokens: int, backward: bool = False) -> None:
        """Record ``passes`` policy passes that processed ``tokens`` tokens in all."""
        if backward:
            self.policy_backward += passes
        else:
            self.policy_forward += passes
        self.policy_tokens += tokens

    def count_reward(self, passes: int, tokens: int, backward: bool = False) -> None:
        """Record ``passes`` reward passes that processed ``tokens`` tokens in all."""
        if backward:
            self.reward_backward += passes
        else:
            self.reward_forward += passes
        self.reward_tokens += tokens

    def add(self, other: "Stats") -> None:
        """Add another's counters (wall time is not added: callers decide how shared time is split)."""
        for f in dataclasses.fields(self):
            if f.name != "wall_s":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def add_work(self, other: "Stats") -> None:
        """Add only another's model work (passes, tokens), not its decisions: work done ahead and then discarded."""
        for name in WORK:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """Every counter plus the derived totals."""
        out: dict[str, Any] = dataclasses.asdict(self)
        out["model_calls"] = self.model_calls
        out["model_calls_paper"] = self.model_calls_paper
        out["rejection_rate"] = self.rejection_rate
        out["rejection_rate_generations"] = self.rejection_rate_generations
        return out


WORK = ("policy_forward", "policy_backward", "reward_forward", "reward_backward", "policy_tokens", "reward_tokens", "rollout_tokens")
"""The :class:`Stats` fields that count model work rather than decisions."""
