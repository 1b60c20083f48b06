"""What a decoding method sees of one ``generate`` call: the models, scoring, and each request's budget,
stop strings, seeded generator, text stream and result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import ConfigError, NablaConfig
from ..methods import get_method, method_names
from ..rewards.base import RewardAdapter
from .accounting import Stats
from .constraints import Grammar
from .policy import Policy
from .rollout import keyed_generator
from .scoring import counted
from .stream import TextStream
from .trace import PositionRecord
from .types import AnswerExtractor, Request, Result, TokenCallback


def wanted_tokens(request: Request, config: NablaConfig) -> int:
    """The request's max_new_tokens, else the config's (before the model's context cuts it)."""
    return request.max_new_tokens if request.max_new_tokens is not None else config.max_new_tokens


@dataclass(frozen=True)
class DecodingContext:
    """The models and settings of one call; the methods in :mod:`nabla_lc.strategies` decode through it."""

    policy: Policy
    reward: RewardAdapter | None
    config: NablaConfig
    extract: AnswerExtractor
    """Answer of a response text (self-consistency and weighted BoN vote on it)."""
    on_token: TokenCallback | None = None
    """``on_token(request_index, text_delta)`` for committed text."""

    def with_config(self, config: NablaConfig) -> "DecodingContext":
        """The same call under other settings."""
        return dataclasses.replace(self, config=config)

    def require_reward(self, what: str) -> RewardAdapter:
        if self.reward is None:
            free = [name for name in method_names() if not get_method(name).needs_reward]
            raise ConfigError(f"method {what!r} needs a reward model; pass reward=... or use a method without one: {free}")
        return self.reward

    def score(self, prompt: str, responses: Sequence[Sequence[int]], stats: Stats, partial: bool = False) -> list[float]:
        """Rewards of responses to one prompt, in one batched pass (counted in ``stats``).

        ``partial``: the responses are unfinished (step-level search), scored by :meth:`RewardAdapter.score_partial`.
        """
        reward = self.require_reward("scoring")
        score = reward.score_partial if partial else reward.score
        return counted(reward, score([prompt] * len(responses), [list(r) for r in responses]), len(responses), stats)

    # --- per request ----------------------------------------------------------------------
    def budget(self, request: Request) -> int:
        """Response tokens allowed: the request's or config's max, within the room the model's context leaves
        (:meth:`~nabla_lc.engine.policy.Policy.room`)."""
        return min(wanted_tokens(request, self.config), self.policy.room(request.prompt_ids))

    def stop(self, request: Request) -> tuple[str, ...]:
        return request.stop if request.stop is not None else self.config.stop

    def generator(self, request: Request, sample: int = 0, device: torch.device | str | None = None) -> torch.Generator | None:
        """A generator seeded by (seed, prompt, sample): the same input decodes the same way in any batch. It lives on
        ``device`` (default: the policy's, where tokens are sampled)."""
        seed = request.seed if request.seed is not None else self.config.seed
        if seed is None:
            return None
        return keyed_generator(f"{seed}:{sample}:{','.join(map(str, request.prompt_ids))}", self.policy.device if device is None else device)

    def grammar(self, request: Request) -> Grammar | None:
        """A fresh parse state of the request's constraint (None without one)."""
        return Grammar.start(self.policy, request.constraint, self.budget(request)) if request.constraint is not None else None

    def text_stream(self, request: Request, index: int) -> TextStream:
        """The stream of request ``index``'s committed text, reported to ``on_token``."""
        on_token = self.on_token
        emit = (lambda text: on_token(index, text)) if on_token is not None else None
        return TextStream(self.policy.decode, self.stop(request), emit)

    def result(
        self,
        stream: TextStream,
        tokens: list[int],
        finish_reason: str,
        stats: Stats,
        reward: float | None,
        trace: list[PositionRecord],
    ) -> Result:
        text = stream.close()
        reason = "length" if finish_reason == "length" and not stream.stopped else "stop"
        stats.response_tokens = len(tokens)
        return Result(text, tokens, reason, stats, reward, self.extract(text), trace)  # type: ignore[arg-type]
