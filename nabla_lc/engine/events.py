"""Streaming one request as typed events, over any ``submit`` (the engine's, or a test's over a blocking generate).

The decoding runs wherever ``submit`` puts it (the engine's scheduler thread); its text deltas come back
through a queue. A consumer that stops early (closes the iterator, or is cancelled) cancels the decoding.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator, Protocol

from ..config import NablaConfig
from .types import Finished, Request, Result, StreamEvent, TextDelta, TokenCallback


class Submit(Protocol):
    def __call__(self, requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None) -> Future[list[Result]]: ...


class Generate(Protocol):
    def __call__(self, requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None) -> list[Result]: ...


def in_thread(generate: Generate) -> Submit:
    """A ``submit`` over a blocking ``generate``: each call runs in a worker thread (cancelling cannot stop it)."""

    def submit(requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None) -> Future[list[Result]]:
        future: Future[list[Result]] = Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(generate(requests, config, on_token))
            except BaseException as error:
                future.set_exception(error)

        threading.Thread(target=work, name="nabla-generate", daemon=True).start()
        return future

    return submit


def _start(submit: Submit, request: Request, config: NablaConfig, put: Callable[[object], object]) -> Future[list[Result]]:
    """Submit one request; each text delta, then its future once done, goes to ``put`` (in that order)."""

    def on_token(_index: int, delta: str) -> None:
        if delta:
            put(TextDelta(delta))

    future = submit([request], config, on_token=on_token)
    future.add_done_callback(put)
    return future


def _event(item: object) -> StreamEvent:
    """A queued item as an event; a finished future becomes :class:`Finished` (or raises its error)."""
    if isinstance(item, Future):
        [result] = item.result()  # raises the decoding's error, or CancelledError
        return Finished(result)
    assert isinstance(item, TextDelta)
    return item


def stream_events(submit: Submit, request: Request, config: NablaConfig) -> Iterator[StreamEvent]:
    """Text deltas of one request as they are committed, then :class:`Finished` with its result."""
    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    future = _start(submit, request, config, items.put)
    try:
        while True:
            event = _event(items.get())
            yield event
            if isinstance(event, Finished):
                return
    finally:
        future.cancel()  # why: a consumer that stops early frees the decoding's rows (a no-op once it is done)


async def astream_events(submit: Submit, request: Request, config: NablaConfig) -> AsyncIterator[StreamEvent]:
    """The async form of :func:`stream_events`."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()
    future = _start(submit, request, config, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    try:
        while True:
            event = _event(await items.get())
            yield event
            if isinstance(event, Finished):
                return
    finally:
        future.cancel()
