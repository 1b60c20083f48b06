"""Stopping the server: it stops accepting connections, lets a request in flight finish, and frees its port; a client
that goes away mid-stream frees its place (tests/test_scheduler.py checks that its rows are freed too)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx

from nabla_lc import NablaConfig
from nabla_lc.engine.types import Request, StreamEvent

from ..fake_engine import FakeEngine, default_responder
from ..server_harness import AUTH, running_server

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 100}


def refuses(url: str) -> bool:
    """Whether the server's port refuses a new connection."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except OSError:
        return True
    return False


def until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_flight(url: str) -> int:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", headers=AUTH).text
    return int(next(line for line in text.splitlines() if line.startswith("nabla_requests_in_flight ")).split()[1])


def test_a_request_in_flight_finishes_while_the_server_stops() -> None:
    release, entered = threading.Event(), threading.Event()

    def held(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
        entered.set()
        release.wait(120)
        return default_responder(prompt_text, user_text, seed, sample)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with running_server(FakeEngine(responder=held)) as url:
            first = pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=BODY, timeout=180)
            assert entered.wait(60), "the request never reached the engine"
            # released only once the stopping server refuses new connections: the request is in flight throughout
            releaser = pool.submit(lambda: (until(lambda: refuses(url), "the server to stop accepting"), release.set()))
        answer = first.result(timeout=120)
        releaser.result(timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"].startswith("Answer to slow")
    assert refuses(url)


class HeldAfterFirst(FakeEngine):
    """Streams its first event, then waits until the server closes the stream (only a client that leaves ends it)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()

    async def _held(self, request: Request, config: NablaConfig | None) -> AsyncIterator[StreamEvent]:
        events = super().astream(request, config)
        try:
            yield await events.__anext__()
            await asyncio.Event().wait()
        finally:
            self.closed.set()
            await events.aclose()  # type: ignore[attr-defined]

    def astream(self, request: Request, config: NablaConfig | None = None) -> AsyncIterator[StreamEvent]:
        return self._held(request, config)


def test_a_client_gone_mid_stream_frees_its_place() -> None:
    engine = HeldAfterFirst()
    with running_server(engine) as url:
        with httpx.stream("POST", url + "/chat/completions", headers=AUTH, json={**BODY, "stream": True}, timeout=60) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # the first event: the request is decoding, and stays so while the client is here
            assert in_flight(url) == 1
        assert engine.closed.wait(60), "the server never closed the stream of the client that left"
        until(lambda: in_flight(url) == 0, "the server to free the place of the client that left")
