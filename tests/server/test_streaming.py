"""Streamed responses: server-sent events in OpenAI's chunk format. Every frame is ``data: JSON`` with the chunk's
shape, one chunk ends the choice with its finish reason, the usage chunk comes only when asked, ``data: [DONE]`` ends
the stream; the streamed text is the non-streamed text."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
import openai

from nabla_lc import Engine, NablaConfig
from nabla_lc.engine.types import Request, StreamEvent

from ..fake_engine import FakeEngine
from ..server_harness import AUTH, GREEDY, alone, running_server

CHUNK_KEYS = {"id", "object", "created", "model", "choices"}


def frames(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON payloads of a streamed response, checked to be well-formed events ending with ``data: [DONE]``."""
    with httpx.stream("POST", url + path, headers=AUTH, json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], "the stream must end with data: [DONE] and nothing after it"
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-2])
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def check_chunks(chunks: list[dict[str, Any]], obj: str, usage: bool) -> None:
    """One id, object, created and model throughout; each choice's shape; exactly one finish reason, in the last
    chunk with choices; with ``usage`` a last chunk with no choices and every other chunk's usage null."""
    assert chunks and all(set(c) - {"usage", "nabla"} == CHUNK_KEYS for c in chunks)
    assert len({(c["id"], c["object"], c["created"], c["model"]) for c in chunks}) == 1 and chunks[0]["object"] == obj
    with_choices = chunks[:-1] if usage else chunks
    for chunk in with_choices:
        [choice] = chunk["choices"]
        keys = {"index", "delta", "logprobs", "finish_reason"} if obj == "chat.completion.chunk" else {"index", "text", "logprobs", "finish_reason"}
        assert set(choice) == keys and choice["index"] == 0 and choice["logprobs"] is None
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in ("stop", "length", "tool_calls")
    if usage:
        last = chunks[-1]
        assert last["choices"] == [] and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


def test_chat_frames(fake_url: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 100, "seed": 7}
    for usage in (False, True):
        chunks = frames(fake_url, "/chat/completions", {**body, **({"stream_options": {"include_usage": True}} if usage else {})})
        check_chunks(chunks, "chat.completion.chunk", usage)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(set(c["choices"][0]["delta"]) <= {"content"} for c in chunks[1:] if c["choices"])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "Answer to q (seed 7, sample 0). STOP here. The end."


def test_text_completion_frames(fake_url: str) -> None:
    body = {"model": "tiny", "prompt": "q", "max_tokens": 100, "seed": 7, "stop": "STOP"}
    for usage in (False, True):
        chunks = frames(fake_url, "/completions", {**body, **({"stream_options": {"include_usage": True}} if usage else {})})
        check_chunks(chunks, "text_completion", usage)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Answer to q (seed 7, sample 0). "
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


class FailingMidStream(FakeEngine):
    """Streams its first event, then fails as an engine input check does (a ValueError)."""

    async def _fail_after_first(self, request: Request, config: NablaConfig | None) -> AsyncIterator[StreamEvent]:
        events = super().astream(request, config)
        yield await events.__anext__()
        await events.aclose()  # type: ignore[attr-defined]
        raise ValueError("the engine refused the request mid-stream")

    def astream(self, request: Request, config: NablaConfig | None = None) -> AsyncIterator[StreamEvent]:
        return self._fail_after_first(request, config)


def test_an_error_after_the_headers_ends_the_stream_with_an_error_event() -> None:
    with running_server(FailingMidStream()) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "stream": True}
        with httpx.stream("POST", url + "/chat/completions", headers=AUTH, json=body, timeout=60) as response:
            assert response.status_code == 200
            events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-1])
    error = json.loads(events[-3].removeprefix("data: "))  # the error event, then [DONE] (as vLLM ends such a stream)
    assert set(error) == {"error"} and error["error"]["code"] == "invalid_value" and "mid-stream" in error["error"]["message"]


def test_chat_stream_with_usage(client: openai.OpenAI, tiny_engine: Engine) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=1, stream=True,
        stream_options={"include_usage": True}, extra_body=GREEDY,
    ))
    expected = alone(tiny_engine, "hi", seed=1, max_new_tokens=16, method="greedy")
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].model_extra["nabla"]["stats"]["response_tokens"] == len(expected.token_ids)


def test_text_completion_stream_matches_the_engine(client: openai.OpenAI, tiny_engine: Engine) -> None:
    expected = alone(tiny_engine, "abc", chat=False, seed=2, max_new_tokens=10, method="bon", n=2)
    body = {"nabla": {"method": "bon", "n": 2}}
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=10, seed=2, stream=True, extra_body=body))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
