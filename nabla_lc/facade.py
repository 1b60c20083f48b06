"""The engine: loaded models, request validation, and dispatch of registered decoding methods to its scheduler."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Iterator, Sequence

import torch
from torch import nn

from .answers import find_answer
from .config import ConfigError, NablaConfig, check_logprobs
from .engine.constraints import compile_constraint
from .engine.context import DecodingContext, wanted_tokens
from .engine.events import astream_events, stream_events
from .engine.policy import Policy
from .engine.types import AnswerExtractor, Constraint, Request, Result, StreamEvent, TokenCallback
from .methods import get_method, method_names
from .rewards.base import RewardAdapter
from .scheduler import Scheduler
from .strategies import SampleSet, draw_steps, select

log = logging.getLogger(__name__)


class Engine:
    """A loaded policy (and reward) that decodes batches of requests with any method.

    One engine serves many callers: every call becomes a job of its :class:`~nabla_lc.scheduler.Scheduler`, whose
    one thread owns the models and samples the rollouts of all jobs in flight together (continuous batching).
    Concurrent calls from threads or tasks therefore share batches, and each result is the one the call would get
    alone (every row has its own seeded generator). Code that uses the models directly holds :attr:`lock`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, reward: RewardAdapter | None = None, config: NablaConfig | None = None) -> None:
        self.policy = Policy(model, tokenizer)
        self.reward = reward
        if reward is not None:
            reward.check_vocab(tokenizer)
        self.config = config or NablaConfig()
        self.lock = threading.RLock()
        self.scheduler = Scheduler(self.policy, self.lock)

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
        constraint: Constraint | None = None,
    ) -> Request:
        """A request for a user prompt, templated with the chat template when ``chat``.

        A prompt or system message that is not a ``str`` raises ``TypeError``; one that is not valid Unicode text
        (lone surrogates, as undecodable bytes become) raises ``ValueError``; bad other fields: see :class:`Request`.
        """
        checked_text("prompt", prompt)
        if system is not None:
            checked_text("system", system)
        ids = self.policy.template(prompt, system=system, chat=chat)
        return Request(tuple(ids), prompt, seed, max_new_tokens, tuple(stop) if stop is not None else None, constraint)

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
        """A request for a conversation (role/content dicts); the reward sees ``question`` (default: the last user
        message).

        Contents are checked as :meth:`request` checks a prompt. Assistant messages may carry ``tool_calls`` and
        ``tool`` messages answer them, as the chat template takes them; ``tools`` (OpenAI-style function
        definitions) go to the chat template too.
        """
        for i, m in enumerate(messages):
            checked_text(f"messages[{i}]['content']", m["content"])
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("the conversation has no user message")
        if not any(m["content"].strip() for m in messages):
            raise ValueError("the conversation is empty: every message's content is empty or blank")
        ids = self.policy.template_messages(messages, tools)
        reward_prompt = users[-1] if question is None else checked_text("question", question)
        return Request(tuple(ids), reward_prompt, seed, max_new_tokens, tuple(stop) if stop is not None else None, constraint)

    def context(
        self, config: NablaConfig | None = None, on_token: TokenCallback | None = None, extract_answer: AnswerExtractor | None = None
    ) -> DecodingContext:
        """What a method sees of a call with ``config`` (default: the engine's)."""
        return DecodingContext(self.policy, self.reward, config or self.config, extract_answer or find_answer, on_token)

    # --- decoding -------------------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[Request],
        config: NablaConfig | None = None,
        on_token: TokenCallback | None = None,
        extract_answer: AnswerExtractor | None = None,
    ) -> list[Result]:
        """Decode a batch with ``config.method`` (default: the engine's config)."""
        return _wait(self.submit(requests, config, on_token, extract_answer))

    async def agenerate(
        self,
        requests: Sequence[Request],
        config: NablaConfig | None = None,
        on_token: TokenCallback | None = None,
        extract_answer: AnswerExtractor | None = None,
    ) -> list[Result]:
        """The async form of :meth:`generate`; cancelling the awaiting task stops the decoding at the next token."""
        return await asyncio.wrap_future(self.submit(requests, config, on_token, extract_answer))

    def submit(
        self,
        requests: Sequence[Request],
        config: NablaConfig | None = None,
        on_token: TokenCallback | None = None,
        extract_answer: AnswerExtractor | None = None,
    ) -> Future[list[Result]]:
        """Queue a batch with the scheduler (bad requests raise here); cancelling the future stops its decoding.

        ``on_token`` is called on the scheduler's thread.
        """
        ctx = self.context(config, on_token, extract_answer)
        requests = self._validated(requests, ctx)
        spec = get_method(ctx.config.method)
        if not requests or self.scheduler.on_thread():  # why: a job that decodes more (a judge) runs it inline
            done: Future[list[Result]] = Future()
            with torch.no_grad():
                done.set_result(spec.run(ctx, requests) if requests else [])
            return done
        if spec.steps is None:
            return self.scheduler.call(lambda: spec.run(ctx, requests))
        return self.scheduler.submit(spec.steps(ctx, requests), passes=spec.dto_passes)

    def stream(self, request: Request, config: NablaConfig | None = None) -> Iterator[StreamEvent]:
        """:class:`~nabla_lc.engine.types.TextDelta` events as text is committed, then
        :class:`~nabla_lc.engine.types.Finished` with the result; closing the iterator early cancels the decoding."""
        return stream_events(self.submit, request, config or self.config)

    def astream(self, request: Request, config: NablaConfig | None = None) -> AsyncIterator[StreamEvent]:
        """The async form of :meth:`stream`."""
        return astream_events(self.submit, request, config or self.config)

    def sample(
        self, requests: Sequence[Request], config: NablaConfig, *, scored: bool, extract_answer: AnswerExtractor | None = None
    ) -> list[SampleSet]:
        """``config.n`` samples of every request (scored when ``scored``), for :meth:`select` at any N ≤ n.

        One set serves Best-of-N, self-consistency and weighted BoN at every N up to n, exactly as
        separate runs would: sample j of a request is seeded by (seed, prompt, j).
        """
        ctx = self.context(config, extract_answer=extract_answer)
        requests = self._validated(requests, ctx)
        return _wait(self.scheduler.submit(draw_steps(ctx, requests, scored)))

    def select(self, sample_set: SampleSet, config: NablaConfig, extract_answer: AnswerExtractor | None = None) -> Result:
        """The result of ``config.method`` (a method with a chooser) at N = ``config.n`` from a sample set."""
        if get_method(config.method).chooser is None:
            choosers = [name for name in method_names() if get_method(name).chooser is not None]
            raise ConfigError(f"method {config.method!r} does not select from samples; use one of {sorted(choosers)}")
        return select(self.context(config, extract_answer=extract_answer), sample_set)

    def _validated(self, requests: Sequence[Request], ctx: DecodingContext) -> list[Request]:
        requests = list(requests)
        for request in requests:
            self._validate(request, ctx.config)
        return requests

    def _validate(self, request: Request, config: NablaConfig) -> None:
        room = self.policy.room(request.prompt_ids)
        if request.constraint is not None:  # a bad grammar, or a method that would ignore it, fails here, before any decoding
            if not get_method(config.method).constrained:
                honour = [name for name in method_names() if get_method(name).constrained]
                raise ConfigError(f"method {config.method!r} does not decode under Request.constraint; use one of {honour}")
            compile_constraint(self.policy, request.constraint)
        if request.logprobs is not None:
            check_logprobs(config.method)
        if wanted_tokens(request, config) > room:
            log.warning("max_new_tokens is cut to %d to fit the model's context of %d", room, self.policy.max_length)


def _wait(future: Future[Any]) -> Any:
    """The future's outcome; an interrupted wait (Ctrl-C) cancels it."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


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
