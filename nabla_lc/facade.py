"""The engine: models, a lock, request validation, scoring, and dispatch to a decoding method."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..answers import find_answer
from ..config import ConfigError, NablaConfig
from ..rewards.base import RewardAdapter, checked_scores
from .accounting import Stats
from .policy import Policy
from .stream import TextStream
from .trace import PositionRecord
from .types import AnswerExtractor, Request, Result, TokenCallback

if TYPE_CHECKING:
    from ..strategies import SampleSet

log = logging.getLogger(__name__)


class Engine:
    """A loaded policy (and reward) that decodes batches of requests with any method.

    One engine serves many callers: :meth:`generate` holds :attr:`lock`, so concurrent calls from
    threads never interleave model state.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, reward: RewardAdapter | None = None, config: NablaConfig | None = None) -> None:
        self.policy = Policy(model, tokenizer)
        self.reward = reward
        if reward is not None:
            reward.check_vocab(tokenizer)
        self.config = config or NablaConfig()
        self.lock = threading.RLock()

    # --- requests -------------------------------------------------------------------------
    def request(
        self,
        prompt: str,
        *,
        chat: bool = True,
        system: str | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Request:
        """A request for a user prompt, templated with the chat template when ``chat``.

        A prompt or system message that is not a ``str`` raises ``TypeError``; one that is not valid Unicode text
        (lone surrogates, as undecodable bytes become) raises ``ValueError``; bad other fields: see :class:`Request`.
        """
        checked_text("prompt", prompt)
        if system is not None:
            checked_text("system", system)
        ids = self.policy.template(prompt, system=system, chat=chat)
        return Request(tuple(ids), prompt, seed, max_new_tokens, tuple(stop) if stop is not None else None)

    def request_from_messages(
        self,
        messages: Sequence[dict[str, str]],
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Request:
        """A request for a conversation (role/content dicts); the reward sees the last user message.

        Contents are checked as :meth:`request` checks a prompt.
        """
        for i, m in enumerate(messages):
            checked_text(f"messages[{i}]['content']", m["content"])
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users or not any(m["content"].strip() for m in messages):
            raise ValueError("the conversation has no user message")
        ids = self.policy.template_messages(messages)
        return Request(tuple(ids), users[-1], seed, max_new_tokens, tuple(stop) if stop is not None else None)

    # --- decoding -------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[Request],
        config: NablaConfig | None = None,
        on_token: TokenCallback | None = None,
        extract_answer: AnswerExtractor | None = None,
    ) -> list[Result]:
        """Decode a batch with ``config.method`` (default: the engine's config)."""
        from ..strategies import STRATEGIES  # the methods are built on this engine's primitives

        config = config or self.config
        requests = list(requests)
        for request in requests:
            self._validate(request, config)
        if not requests:
            return []
        with self.lock, torch.no_grad():
            return STRATEGIES[config.method](self, requests, config, on_token, extract_answer or find_answer)

    def sample(
        self, requests: Sequence[Request], config: NablaConfig, *, scored: bool, extract_answer: AnswerExtractor | None = None
    ) -> list["SampleSet"]:
        """``config.n`` samples of every request (scored when ``scored``), for :meth:`select` at any N ≤ n.

        One set serves Best-of-N, self-consistency and weighted BoN at every N up to n, exactly as
        separate runs would: sample j of a request is seeded by (seed, prompt, j).
        """
        from ..strategies import draw

        requests = list(requests)
        for request in requests:
            self._validate(request, config)
        with self.lock, torch.no_grad():
            return draw(self, requests, config, extract_answer or find_answer, scored)

    def select(self, sample_set: "SampleSet", config: NablaConfig, extract_answer: AnswerExtractor | None = None) -> Result:
        """The result of ``config.method`` (greedy, bon, sc or weighted_bon) at N = ``config.n`` from a sample set."""
        from ..strategies import CHOOSERS, select

        if config.method not in CHOOSERS:
            raise ConfigError(f"method {config.method!r} does not select from samples; use one of {sorted(CHOOSERS)}")
        return select(self, sample_set, config, extract_answer or find_answer)

    def score(self, prompt: str, responses: Sequence[Sequence[int]], stats: Stats) -> list[float]:
        """Rewards of full responses to one prompt, in one batched pass (counted in ``stats``)."""
        reward = self.require_reward("scoring")
        scores = reward.score([prompt] * len(responses), [list(r) for r in responses])
        stats.count_reward(scores.passes, scores.tokens)
        values = checked_scores(reward, scores, len(responses))
        nonfinite = sum(not math.isfinite(v) for v in values)
        if nonfinite:
            name = type(reward).__name__
            log.warning("%s gave %d of %d responses a NaN or infinite reward; they rank below every finite one", name, nonfinite, len(values))
            stats.nonfinite_rewards += nonfinite
        return values

    def require_reward(self, what: str) -> RewardAdapter:
        if self.reward is None:
            raise ConfigError(f"method {what!r} needs a reward model; pass reward=... or use method='greedy' or 'sc'")
        return self.reward

    # --- helpers for the methods --------------------------------------------------------------
    def budget(self, request: Request, config: NablaConfig) -> int:
        """Response tokens allowed: the request's or config's max, within the model's context."""
        return min(self._wanted(request, config), self.policy.max_length - len(request.prompt_ids))

    @staticmethod
    def _wanted(request: Request, config: NablaConfig) -> int:
        return request.max_new_tokens if request.max_new_tokens is not None else config.max_new_tokens

    def stop(self, request: Request, config: NablaConfig) -> tuple[str, ...]:
        return request.stop if request.stop is not None else config.stop

    def generator(self, request: Request, config: NablaConfig, sample: int = 0) -> torch.Generator | None:
        """A generator seeded by (seed, prompt, sample): the same input decodes the same way in any batch."""
        seed = request.seed if request.seed is not None else config.seed
        if seed is None:
            return None
        key = f"{seed}:{sample}:{','.join(map(str, request.prompt_ids))}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def text_stream(self, request: Request, config: NablaConfig, index: int, on_token: TokenCallback | None) -> TextStream:
        emit = (lambda text: on_token(index, text)) if on_token is not None else None
        return TextStream(self.policy.decode, self.stop(request, config), emit)

    def result(
        self,
        stream: TextStream,
        tokens: list[int],
        finish_reason: str,
        stats: Stats,
        reward: float | None,
        extract: AnswerExtractor,
        trace: list[PositionRecord],
    ) -> Result:
        text = stream.close()
        reason = "length" if finish_reason == "length" and not stream.stopped else "stop"
        stats.response_tokens = len(tokens)
        return Result(text, tokens, reason, stats, reward, extract(text), trace)  # type: ignore[arg-type]

    def _validate(self, request: Request, config: NablaConfig) -> None:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.policy.max_length - len(request.prompt_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens, which fills the model's context of {self.policy.max_length}"
            )
        if self._wanted(request, config) > room:
            log.warning("max_new_tokens is cut to %d to fit the model's context of %d", room, self.policy.max_length)


def checked_text(name: str, value: Any) -> str:
    """``value`` when it is a ``str`` of valid Unicode text; else ``TypeError`` (not a str) or ``ValueError``, naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # why: lone surrogates (undecodable input bytes) would reach the tokenizer's TypeError
        raise ValueError(f"{name} is not valid Unicode text: {err.reason} at index {err.start} ({value[err.start:err.end]!r})") from None
    return value


__all__ = ["Engine"]
