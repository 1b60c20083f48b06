"""The reward interface the engine calls."""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Sequence, TypeVar

import torch

RewardKind = Literal["outcome", "process"]


class NoGradientError(RuntimeError):
    """The reward cannot take gradients with respect to token vectors."""


class RewardOutputError(ValueError):
    """A reward adapter returned something other than what its interface promises; the message names the adapter."""


@dataclass
class Scores:
    """Rewards of a batch, with the reward-model work that produced them."""

    values: torch.Tensor
    """[B] float32 rewards."""
    passes: int
    """Reward-model forward passes (per sequence)."""
    tokens: int
    """Tokens the reward model processed."""


@dataclass
class SoftScore:
    """A differentiable reward, with the reward-model work of its forward pass."""

    value: torch.Tensor
    """Scalar reward; differentiable with respect to the soft token vectors."""
    passes: int
    tokens: int


State = TypeVar("State")
"""An adapter's own prefix state (for example a KV cache)."""


@dataclass
class RewardPrefix(Generic[State]):
    """The fixed part of a reward input (template, prompt, committed tokens), encoded once and extended as tokens are committed."""

    state: State
    """Adapter-specific data, typed by the adapter."""
    passes: int
    """Forward passes spent encoding it (0 when nothing was encoded)."""
    tokens: int


class RewardAdapter(ABC, Generic[State]):
    """A reward r(y|x) on policy token ids, differentiable on soft one-hots when it can be.

    Responses always arrive in the *policy's* vocabulary; adapters map them to their own.
    """

    kind: RewardKind = "outcome"
    """``outcome`` (one score per response) or ``process`` (a score per step, aggregated)."""
    name: str | None = None
    """What names this reward where outputs are cached: a name (``judge``), a checkpoint path, or a file's path
    with its content hash. Set by :func:`~nabla_lc.rewards.load.load_reward` and :meth:`LoRAReward.load`."""

    @property
    def identity(self) -> str:
        """:attr:`name`; an adapter built in code without one is named by its class."""
        return self.name or type(self).__qualname__

    @property
    def differentiable(self) -> bool:
        """Whether :meth:`score_soft` is available."""
        return True

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        """Rewards of responses (policy token ids) to prompts (the user's text), batched."""

    def score_groups(
        self, groups: Sequence[tuple[Sequence[str], Sequence[Sequence[int]]]], prefixes: Sequence[RewardPrefix[State] | None] | None = None
    ) -> list[Scores]:
        """:meth:`score` of several groups of (prompts, responses) (the comparisons of concurrent requests), each
        group's :class:`Scores` counting its own responses.

        ``prefixes``: per group, None or a prefix (:meth:`prepare`, :meth:`extend`) of the group's prompt whose
        committed tokens begin each of its responses; an adapter may then encode only what follows it (the same
        rewards, to float precision). This default scores the groups one by one, whole; adapters that can run them in
        one batched pass, or after their prefixes, override it."""
        return [self.score(prompts, responses) for prompts, responses in groups]

    def score_partial(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        """Rewards of partial responses (the response so far, as step-level search scores it), batched.

        This default scores each partial response as if it were complete: exact for a process reward that reads
        a score at the end of every step (a causal model's reads do not see what follows them), an approximation
        for an outcome reward, which was trained on finished responses. Adapters with a better partial score
        override it.
        """
        return self.score(prompts, responses)

    def prepare(self, prompt: str, committed: Sequence[int]) -> RewardPrefix[State]:
        """Encode the fixed part of the input once; :meth:`score_soft` continues from it."""
        raise NoGradientError(f"{type(self).__name__} cannot take gradients")

    def extend(self, prefix: RewardPrefix[State], prompt: str, committed: Sequence[int]) -> RewardPrefix[State]:
        """The prefix for ``committed``, which extends the committed tokens of ``prefix``.

        ``passes``/``tokens`` of the result count only the new work. This default encodes it afresh.
        """
        return self.prepare(prompt, committed)

    def score_soft(self, prefix: RewardPrefix[State], y: torch.Tensor) -> SoftScore:
        """Differentiable reward of ``committed + y``.

        y: [L, V_policy] token vectors over the policy vocabulary (straight-through one-hots in DTO).
        """
        raise NoGradientError(f"{type(self).__name__} cannot take gradients")

    def score_soft_batch(self, prefixes: Sequence[RewardPrefix[State]], ys: Sequence[torch.Tensor]) -> list[SoftScore]:
        """:meth:`score_soft` of several prefixes and token vectors (DTO passes of several requests). This default
        scores them one by one; adapters that can run them in one batched pass override it."""
        return [self.score_soft(prefix, y) for prefix, y in zip(prefixes, ys)]

    def check_vocab(self, policy_tokenizer: Any) -> None:
        """Raise a clear error when the policy's tokens cannot be fed to this reward."""


# --- checking what adapters return (the one place; the engine calls these on every reward output) ---------


def checked_scores(adapter: RewardAdapter, scores: Scores, count: int) -> list[float]:
    """The rewards of :meth:`RewardAdapter.score` as floats, after checking there is one per response."""
    values = scores.values
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (count,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise RewardOutputError(f"{type(adapter).__name__}.score returned values of shape {shape} for {count} responses; expected ({count},)")
    return [float(v) for v in values.detach().float().cpu()]


def checked_soft(adapter: RewardAdapter, soft: SoftScore) -> SoftScore:
    """A :meth:`RewardAdapter.score_soft` result, after checking it is one differentiable number."""
    value = soft.value
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
        what = f"shape {tuple(value.shape)}, requires_grad={value.requires_grad}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise RewardOutputError(f"{type(adapter).__name__}.score_soft returned {what}; expected one differentiable number")
    return SoftScore(value.reshape(()), soft.passes, soft.tokens)


def rank(reward: float) -> float:
    """The value rewards are compared by: a NaN or infinite reward ranks below every finite one."""
    return reward if math.isfinite(reward) else -math.inf


def file_identity(path: str | Path) -> str:
    """``<absolute path>@sha256:<first 16 hex digits of the content>``: a reward file's :attr:`RewardAdapter.name`."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path}@sha256:{digest.hexdigest()[:16]}"
