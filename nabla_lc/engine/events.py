"""Streaming one request as typed events, over any ``generate`` (the engine's, or a test's scripted one).

Decoding runs in a worker thread (sync) or the default executor (async); a consumer that stops early
leaves the request running to its end (the engine cannot be interrupted), and its output is dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Protocol

from ..config import NablaConfig
from .types import Finished, Request, Result, StreamEvent, TextDelta, TokenCallback


class Generate(Protocol):
    def __call__(self, requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None) -> list[Result]: ...


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def _decode_into(generate: Generate, request: Request, config: NablaConfig, put: Callable[[object], None]) -> None:
    """Decode one request, passing each text delta, then the result (or a _Failure), to ``put``."""

    def on_token(_index: int, delta: str) -> None:
        if delta:
            put(TextDelta(delta))

    try:
        [result] = generate([request], config, on_token=on_token)
    except BaseException as error:  # handed to the consumer, which re-raises it
        put(_Failure(error))
    else:
        put(Finished(result))


def stream_events(generate: Generate, request: Request, config: NablaConfig) -> Iterator[StreamEvent]:
    """Text deltas of one request as they are committed, then :class:`Finished` with its result."""
    items: queue.SimpleQueue[object] = queue.SimpleQueue()
    threading.Thread(target=_decode_into, args=(generate, request, config, items.put), name="nabla-stream", daemon=True).start()
    while True:
        item = items.get()
        if isinstance(item, _Failure):
            raise item.error
        yield item  # type: ignore[misc]
        if isinstance(item, Finished):
            return


async def astream_events(generate: Generate, request: Request, config: NablaConfig) -> AsyncIterator[StreamEvent]:
    """The async form of :func:`stream_events`: decoding runs in the default executor."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[object] = asyncio.Queue()
    done = loop.run_in_executor(None, _decode_into, generate, request, config, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    while True:
        item = await items.get()
        if isinstance(item, _Failure):
            raise item.error
        yield item  # type: ignore[misc]
        if isinstance(item, Finished):
            await done
            return
