"""``usage``: prompt and completion tokens as the engine counted them, summed into ``total_tokens``; in a stream only
when ``stream_options.include_usage`` asks for it."""

from __future__ import annotations

import httpx
import openai
import pytest

from ..fake_engine import FakeEngine
from ..server_harness import AUTH


def test_chat_usage_counts_the_templated_prompt_and_the_reply(fake_client: openai.OpenAI, fake_engine: FakeEngine) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    out = fake_client.chat.completions.create(model="tiny", messages=messages, max_tokens=100)
    assert out.usage.prompt_tokens == len(fake_engine.template(messages))  # one token per character
    assert out.usage.completion_tokens == len(out.choices[0].message.content)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_text_usage_counts_the_raw_prompt(fake_client: openai.OpenAI) -> None:
    out = fake_client.completions.create(model="tiny", prompt="four", max_tokens=7)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (4, 7, 11)


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_streamed_usage_equals_the_unstreamed(fake_client: openai.OpenAI, path: str) -> None:
    chat = path == "/chat/completions"
    create = fake_client.chat.completions.create if chat else fake_client.completions.create
    body = {"messages": [{"role": "user", "content": "q"}]} if chat else {"prompt": "q"}
    whole = create(model="tiny", max_tokens=30, **body)
    chunks = list(create(model="tiny", max_tokens=30, stream=True, stream_options={"include_usage": True}, **body))
    assert chunks[-1].usage == whole.usage and all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in create(model="tiny", max_tokens=30, stream=True, **body))


def test_continuous_usage_stats_are_refused(fake_url: str) -> None:
    body = {"model": "tiny", "prompt": "q", "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out = httpx.post(fake_url + "/completions", headers=AUTH, json=body)
    assert out.status_code == 400 and out.json()["error"]["param"] == "stream_options.continuous_usage_stats"
