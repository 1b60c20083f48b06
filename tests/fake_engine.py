"""A scripted engine for front-end tests: the real engine's interface, no model.

Prompts are "tokenized" one character per token. Responses come from a ``responder`` (a function of
the templated prompt text, the user's text, the seed and the sample index), are cut at stop strings
and streamed through the real :class:`~nabla_lc.engine.stream.TextStream`, so stop handling in
streaming is the engine's own. Every :meth:`FakeEngine.generate` call is recorded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from nabla_lc.config import NablaConfig
from nabla_lc.engine.accounting import Stats
from nabla_lc.engine.events import astream_events, in_thread, stream_events
from nabla_lc.engine.stream import TextStream
from nabla_lc.engine.trace import PositionRecord
from nabla_lc.engine.types import Constraint, Request, Result, StreamEvent, TokenCallback
from nabla_lc.methods import get_method

Responder = Callable[[str, str, "int | None", int], str]
"""``responder(prompt_text, user_text, seed, sample) -> response text``."""


def default_responder(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
    return f"Answer to {user_text} (seed {seed}, sample {sample}). STOP here. The end."


class CharTokenizer:
    """One token per character."""

    chat_template = "<{role}>{content}</{role}>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@dataclass
class FakeModel:
    name_or_path: str = "fake/char-model"


@dataclass
class FakePolicy:
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    model: FakeModel = field(default_factory=FakeModel)
    renders_tools: bool = False

    def room(self, prompt_ids: Sequence[int]) -> int:
        """The fake has no context limit: any non-empty prompt leaves room."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        return 1 << 20


@dataclass
class Call:
    """One recorded ``generate`` call."""

    requests: list[Request]
    config: NablaConfig
    streamed: bool


class FakeEngine:
    """Implements what the front-ends use of :class:`nabla_lc.facade.Engine`."""

    def __init__(
        self,
        responder: Responder = default_responder,
        config: NablaConfig | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.responder = responder
        self.config = config or NablaConfig(max_new_tokens=200)
        self.delay_s = delay_s
        self.policy = FakePolicy()
        self.reward = None
        self.lock = threading.RLock()
        self.calls: list[Call] = []
        self.active = 0
        self.max_active = 0

    # --- requests, as Engine builds them -----------------------------------------------
    def request(
        self,
        prompt: str,
        *,
        chat: bool = True,
        system: str | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        constraint: Constraint | None = None,
    ) -> Request:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.template(messages) if chat else prompt
        return Request(tuple(self.policy.tokenizer.encode(text)), prompt, seed, max_new_tokens, _stop(stop), constraint)

    def request_from_messages(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: Constraint | None = None,
        question: str | None = None,
    ) -> Request:
        """Tools are refused: the fake's template has no tool section (front-ends render them into a system message)."""
        assert not tools, "the fake chat template renders no tools"
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("the conversation has no user message")
        ids = self.policy.tokenizer.encode(self.template(messages))
        return Request(tuple(ids), users[-1] if question is None else question, seed, max_new_tokens, _stop(stop), constraint)

    def template(self, messages: Sequence[dict[str, Any]]) -> str:
        return "".join(CharTokenizer.chat_template.format(role=m["role"], content=m["content"]) for m in messages) + "<assistant>"

    # --- decoding ------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[Request],
        config: NablaConfig | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Result]:
        config = config or self.config
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                self.calls.append(Call(list(requests), config, on_token is not None))
                return [self._decode(i, r, config, on_token) for i, r in enumerate(requests)]
            finally:
                self.active -= 1

    def stream(self, request: Request, config: NablaConfig | None = None) -> Iterator[StreamEvent]:
        return stream_events(in_thread(self.generate), request, config or self.config)

    def astream(self, request: Request, config: NablaConfig | None = None) -> AsyncIterator[StreamEvent]:
        return astream_events(in_thread(self.generate), request, config or self.config)

    async def agenerate(self, requests: Sequence[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None) -> list[Result]:
        return await asyncio.wrap_future(in_thread(self.generate)(list(requests), config, on_token))

    def _decode(self, index: int, request: Request, config: NablaConfig, on_token: TokenCallback | None) -> Result:
        start = time.perf_counter()
        tokenizer = self.policy.tokenizer
        seed = request.seed if request.seed is not None else config.seed
        prompt_text = tokenizer.decode(request.prompt_ids)
        samples = config.n if get_method(config.method).shares_samples else 1
        texts = [self.responder(prompt_text, request.reward_prompt, seed, k) for k in range(samples)]
        rewards = [_reward(t) for t in texts]
        best = max(range(samples), key=lambda k: rewards[k])
        budget = request.max_new_tokens or config.max_new_tokens
        ids = tokenizer.encode(texts[best])[:budget]
        emit = (lambda delta: on_token(index, delta)) if on_token is not None else None
        stream = TextStream(tokenizer.decode, request.stop if request.stop is not None else config.stop, emit)
        committed: list[int] = []
        for word in _words(ids):
            if stream.stopped:
                break
            time.sleep(self.delay_s)
            committed.extend(word)
            stream.push(word)
        text = stream.close()
        stats = Stats(
            policy_forward=len(committed) * samples,
            policy_tokens=len(committed) * samples,
            rollouts=samples,
            rollout_tokens=len(committed) * samples,
            prompt_tokens=len(request.prompt_ids),
            response_tokens=len(committed),
            wall_s=time.perf_counter() - start,
        )
        finish = "stop" if stream.stopped or len(ids) == len(tokenizer.encode(texts[best])) else "length"
        trace = [PositionRecord(index=0, original_token=committed[0], original_text=chr(committed[0]), entropy=1.0, grad_norm=9.0)]
        sample_info = [{"text": t, "reward": r} for t, r in zip(texts, rewards)] if samples > 1 else []
        return Result(text, committed, finish, stats, rewards[best], None, trace if config.trace else [], sample_info)


def _stop(stop: Sequence[str] | None) -> tuple[str, ...] | None:
    return tuple(stop) if stop is not None else None


def _reward(text: str) -> float:
    """A deterministic score (so Best-of-N has a unique best sample)."""
    return float(sum(map(ord, text)) % 97)


def _words(ids: list[int]) -> list[list[int]]:
    """Split ids into word-sized pieces (each ending after a space), the way tokens arrive."""
    pieces, current = [], []
    for i in ids:
        current.append(i)
        if chr(i) == " ":
            pieces.append(current)
            current = []
    return pieces + ([current] if current else [])
