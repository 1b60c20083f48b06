"""Faulty and hostile requests (issue 34): one request's failure stays its own, bad input is a 400 naming the field,
never a 500, and the connection it came on stays usable."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any, Iterator

import httpx
import pytest

from nabla_lc import Engine

from ..server_harness import API_KEY, running_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"nabla": {"method": "greedy"}}


def impossible(prefix: str = "") -> dict[str, Any]:
    """A response format whose grammar allows no token once ``prefix`` is written (a string pattern nothing matches)."""
    schema = {"type": "string", "pattern": prefix + "[^\\s\\S]"}
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **GREEDY, **fields}


@pytest.fixture(scope="module")
def url(tiny_engine: Engine) -> Iterator[str]:
    with running_server(tiny_engine) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    """One keep-alive connection for the module's requests: every error must leave it usable."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        yield client


def streamed(client: httpx.Client, body: dict[str, Any]) -> list[str]:
    """The data lines of a streamed chat completion."""
    with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def in_flight(client: httpx.Client, base: str) -> int:
    text = client.get(base.removesuffix("/v1") + "/metrics").text
    return int(next(line.split()[-1] for line in text.splitlines() if line.startswith("nabla_requests_in_flight")))


def test_an_impossible_grammar_fails_only_its_own_request(url: str, http: httpx.Client, tiny_engine: Engine) -> None:
    bodies = [chat(f"question {i}", seed=i) for i in range(6)]
    alone = [http.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"] for body in bodies]
    bad, bad_stream = chat("bad", response_format=impossible()), chat("bad later", response_format=impossible("a"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with tiny_engine.lock:  # why: the scheduler waits until all eight are in flight, so they share its batch
            futures = [pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=body, timeout=120) for body in bodies]
            failing = pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=bad, timeout=120)
            failing_stream = pool.submit(streamed, http, bad_stream)
            deadline = time.monotonic() + 120
            while in_flight(http, url) < 8:
                assert time.monotonic() < deadline, "the requests never became in flight together"
                time.sleep(0.02)
        outs = [f.result() for f in futures]
        refused, lines = failing.result(), failing_stream.result()
    assert [out.status_code for out in outs] == [200] * 6
    assert [out.json()["choices"][0]["message"]["content"] for out in outs] == alone
    assert refused.status_code == 400 and "no response satisfies it" in refused.json()["error"]["message"]
    # the streamed one wrote its opening quote and 'a', then failed: an error event, and the stream ends properly
    error = json.loads(lines[-2])["error"]
    assert "no response satisfies it" in error["message"] and error["type"] == "invalid_request_error"
    assert lines[-1] == "[DONE]"
    assert http.post("/chat/completions", json=bodies[0]).json()["choices"][0]["message"]["content"] == alone[0]
