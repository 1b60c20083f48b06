"""Sampling semantics of the server, through real clients: fresh seeds without `seed`, `n` choices, logprobs,
unknown fields, temperature rules and error params (issue 33). A tiny random policy, so sampled texts differ."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading

import dspy
import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from nabla_lc import Engine

from ..server_harness import API_KEY, AUTH, openai_client, running_server
from .test_shutdown import HeldAfterFirst, in_flight, until

MESSAGES = [{"role": "user", "content": "2+2?"}]
SAMPLED = {"nabla": {"method": "bon", "n": 1}}
"""One sample per request at the request's temperature (Best-of-1)."""


def sampled(client: openai.OpenAI, **kwargs: object):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "extra_body": SAMPLED, **kwargs}
    return client.chat.completions.create(**body)  # type: ignore[call-overload]


def alone(engine: Engine, seed: int, logprobs: int | None = None, **config: object):
    """The same request decoded in-process, with ``seed``."""
    request = dataclasses.replace(engine.request("2+2?", seed=seed, max_new_tokens=6), logprobs=logprobs)
    [result] = engine.generate([request], engine.config.replace(**{"method": "bon", "n": 1, "temperature": 1.0, **config}))
    return result


def error_of(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body  # type: ignore[return-value]


# --- seeds ------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrent", [False, True], ids=["alone", "batched"])
def test_without_seed_requests_sample_afresh_and_with_one_they_repeat(client: openai.OpenAI, concurrent: bool) -> None:
    def texts(**kwargs: object) -> list[str]:
        if concurrent:  # eight requests in flight at once: the scheduler decodes them in one batch
            with concurrent_pool() as pool:
                outs = list(pool.map(lambda _: sampled(client, **kwargs), range(8)))
        else:
            outs = [sampled(client, **kwargs) for _ in range(8)]
        return [out.choices[0].message.content for out in outs]

    assert len(set(texts())) > 1
    assert len(set(texts(seed=11))) == 1


def concurrent_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=8)


def test_the_reported_seed_reproduces_a_seedless_request(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = sampled(client)
    seed = out.model_extra["nabla"]["seed"]
    assert isinstance(seed, int)
    assert sampled(client, seed=seed).choices[0].message.content == out.choices[0].message.content == alone(tiny_engine, seed).text
    assert sampled(client, seed=7).model_extra["nabla"]["seed"] == 7


def test_a_stream_reports_its_seed_and_ignored_fields(client: openai.OpenAI) -> None:
    chunks = list(sampled(client, stream=True, stream_options={"include_usage": True}, top_p=0.5, extra_body={"nabla": {"method": "greedy"}}))
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert isinstance(last.model_extra["nabla"]["seed"], int) and set(last.model_extra["nabla"]["ignored"]) == {"temperature", "top_p"}
    assert chunks[-1].model_extra["nabla"] == last.model_extra["nabla"]
    free = list(sampled(client, stream=True))
    seed = next(c for c in free if c.choices and c.choices[0].finish_reason).model_extra["nabla"]["seed"]
    text = "".join(c.choices[0].delta.content or "" for c in free if c.choices)
    assert sampled(client, seed=seed).choices[0].message.content == text


# --- n ----------------------------------------------------------------------------------
def test_n_choices_equal_the_request_alone_with_seed_plus_i(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = sampled(client, n=3, seed=20)
    expected = [alone(tiny_engine, 20 + i) for i in range(3)]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [r.text for r in expected]
    assert [c.message.content for c in out.choices] == [sampled(client, seed=20 + i).choices[0].message.content for i in range(3)]
    assert [c.finish_reason for c in out.choices] == [r.finish_reason for r in expected]
    assert len({c.message.content for c in out.choices}) > 1
    assert out.usage.prompt_tokens == expected[0].stats.prompt_tokens
    assert out.usage.completion_tokens == sum(len(r.token_ids) for r in expected)
    nabla = out.model_extra["nabla"]
    assert [c["seed"] for c in nabla["choices"]] == [20, 21, 22] and nabla["seed"] == 20
    assert nabla["stats"]["rollouts"] == 3 and nabla["stats"]["model_calls"] == sum(r.stats.model_calls for r in expected)


def test_streamed_choices_equal_the_unstreamed_ones(client: openai.OpenAI) -> None:
    whole = sampled(client, n=3, seed=70)
    chunks = list(sampled(client, n=3, seed=70, stream=True, stream_options={"include_usage": True}))
    texts, finishes, nabla = ["", "", ""], [None, None, None], [None, None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert finishes[choice.index] is None  # one finish per choice
                finishes[choice.index], nabla[choice.index] = choice.finish_reason, chunk.model_extra["nabla"]
    assert texts == [c.message.content for c in whole.choices] and finishes == [c.finish_reason for c in whole.choices]
    assert [n["seed"] for n in nabla] == [70, 71, 72]
    usage = chunks[-1]
    assert not usage.choices and usage.usage.model_dump() == whole.usage.model_dump()
    assert usage.model_extra["nabla"]["stats"]["model_calls"] == whole.model_extra["nabla"]["stats"]["model_calls"]
    assert [c["seed"] for c in usage.model_extra["nabla"]["choices"]] == [70, 71, 72]


class CountedCloses:
    """Stands in for :class:`HeldAfterFirst`'s event: counts the streams the server closed."""

    def __init__(self) -> None:
        self.count, self.lock = 0, threading.Lock()

    def set(self) -> None:
        with self.lock:
            self.count += 1


def test_a_client_gone_from_a_stream_of_choices_closes_every_choice() -> None:
    engine = HeldAfterFirst()
    engine.closed = CountedCloses()  # type: ignore[assignment]
    with running_server(engine) as url:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 50, "n": 2, "stream": True}
        with httpx.stream("POST", url + "/chat/completions", headers=AUTH, json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")
            assert in_flight(url) == 1
        until(lambda: engine.closed.count == 2, "the server to close both choices' streams")  # type: ignore[attr-defined]
        until(lambda: in_flight(url) == 0, "the server to free the place of the client that left")


def test_n_choices_are_one_request_in_the_metrics(client: openai.OpenAI, url: str) -> None:
    def counters() -> dict[str, float]:
        text = httpx.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).text
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        names = ("nabla_request_latency_seconds_count", 'nabla_tokens_total{kind="prompt"}', 'nabla_tokens_total{kind="completion"}')
        return {name: float(lines[name]) for name in names}

    before = counters()
    out = sampled(client, n=3, seed=50)
    after = counters()
    assert after["nabla_request_latency_seconds_count"] - before["nabla_request_latency_seconds_count"] == 1
    assert after['nabla_tokens_total{kind="prompt"}'] - before['nabla_tokens_total{kind="prompt"}'] == out.usage.prompt_tokens
    assert after['nabla_tokens_total{kind="completion"}'] - before['nabla_tokens_total{kind="completion"}'] == out.usage.completion_tokens


def test_n_on_text_completions(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = client.completions.create(model="tiny", prompt="1 2 3", max_tokens=5, n=2, seed=3, temperature=1.0, extra_body=SAMPLED)
    config = tiny_engine.config.replace(method="bon", n=1, temperature=1.0)
    expected = [tiny_engine.generate([tiny_engine.request("1 2 3", chat=False, seed=3 + i, max_new_tokens=5)], config)[0] for i in range(2)]
    assert [c.text for c in out.choices] == [r.text for r in expected] and [c.index for c in out.choices] == [0, 1]


def test_n_over_the_cap_is_400(client: openai.OpenAI) -> None:
    assert error_of(lambda: sampled(client, n=9))["param"] == "n"  # the default max_choices is 8
    assert error_of(lambda: sampled(client, n=0))["param"] == "n"


def test_langchain_chat_openai_n(url: str, tiny_engine: Engine) -> None:
    llm = ChatOpenAI(base_url=url, api_key=API_KEY, model="tiny", max_tokens=6, temperature=1.0, seed=30, n=2, max_retries=0, extra_body=SAMPLED)
    [generations] = llm.generate([[HumanMessage("2+2?")]]).generations
    assert [g.message.content for g in generations] == [alone(tiny_engine, 30 + i).text for i in range(2)]


def test_dspy_lm_n(url: str, tiny_engine: Engine) -> None:
    lm = dspy.LM("openai/tiny", api_base=url, api_key=API_KEY, max_tokens=6, temperature=1.0, seed=40, n=2, cache=False, num_retries=0, extra_body=SAMPLED)
    assert lm("2+2?") == [alone(tiny_engine, 40 + i).text for i in range(2)]


# --- logprobs ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["greedy", "bon"])
def test_chat_logprobs_are_the_engines(client: openai.OpenAI, tiny_engine: Engine, method: str) -> None:
    out = sampled(client, seed=5, logprobs=True, top_logprobs=2, extra_body={"nabla": {"method": method, "n": 1}})
    expected = alone(tiny_engine, 5, logprobs=2, method=method)
    content = out.choices[0].logprobs.content
    assert expected.logprobs is not None and len(content) == len(expected.token_ids) == out.usage.completion_tokens
    for got, want in zip(content, expected.logprobs):
        assert got.token == want.chosen.text and got.bytes == list(want.chosen.text.encode())
        assert got.logprob == pytest.approx(want.chosen.logprob, abs=1e-4)
        assert [t.token for t in got.top_logprobs] == [t.text for t in want.top]
        assert got.logprob <= got.top_logprobs[0].logprob + 1e-6
    assert out.choices[0].message.content == expected.text


def test_logprobs_through_chat_openai_and_dspy(url: str, tiny_engine: Engine) -> None:
    expected = alone(tiny_engine, 60, logprobs=2)
    assert expected.logprobs is not None
    llm = ChatOpenAI(base_url=url, api_key=API_KEY, model="tiny", max_tokens=6, temperature=1.0, seed=60, logprobs=True, top_logprobs=2, max_retries=0, extra_body=SAMPLED)
    content = llm.invoke("2+2?").response_metadata["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx([p.chosen.logprob for p in expected.logprobs], abs=1e-4)
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == [[t.text for t in p.top] for p in expected.logprobs]
    lm = dspy.LM("openai/tiny", api_base=url, api_key=API_KEY, max_tokens=6, temperature=1.0, seed=60, n=2, logprobs=True, cache=False, num_retries=0, extra_body=SAMPLED)
    outputs = lm("2+2?")
    assert [o["text"] for o in outputs] == [expected.text, alone(tiny_engine, 61).text]
    assert [c["logprob"] for c in outputs[0]["logprobs"]["content"]] == pytest.approx([p.chosen.logprob for p in expected.logprobs], abs=1e-4)


def test_a_stream_with_logprobs_sends_each_reply_whole_with_them(client: openai.OpenAI) -> None:
    whole = sampled(client, seed=8, n=2, logprobs=True, top_logprobs=2)
    chunks = list(sampled(client, seed=8, n=2, logprobs=True, top_logprobs=2, stream=True))
    held = [(c.choices[0].index, c.choices[0]) for c in chunks if c.choices and c.choices[0].delta.content]
    assert sorted(i for i, _ in held) == [0, 1]  # one content chunk a choice: the reply, whole
    for index, choice in held:
        assert choice.delta.content == whole.choices[index].message.content
        assert choice.logprobs.model_dump() == whole.choices[index].logprobs.model_dump()
    text = list(client.completions.create(model="tiny", prompt="1 2 3", max_tokens=5, seed=2, logprobs=1, stream=True, extra_body=SAMPLED))
    alone_text = client.completions.create(model="tiny", prompt="1 2 3", max_tokens=5, seed=2, logprobs=1, extra_body=SAMPLED)
    [piece] = [c.choices[0] for c in text if c.choices[0].text]
    assert piece.text == alone_text.choices[0].text and piece.logprobs.model_dump() == alone_text.choices[0].logprobs.model_dump()


def test_text_logprobs(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = client.completions.create(model="tiny", prompt="1 2 3", max_tokens=5, seed=2, logprobs=1, extra_body={"nabla": {"method": "greedy"}})
    [expected] = tiny_engine.generate([dataclasses.replace(tiny_engine.request("1 2 3", chat=False, seed=2, max_new_tokens=5), logprobs=1)], tiny_engine.config.replace(method="greedy"))
    logprobs = out.choices[0].logprobs
    assert expected.logprobs is not None and logprobs.tokens == [p.chosen.text for p in expected.logprobs]
    assert logprobs.token_logprobs == pytest.approx([p.chosen.logprob for p in expected.logprobs], abs=1e-4)
    assert [list(top) for top in logprobs.top_logprobs] == [[p.top[0].text] for p in expected.logprobs]
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[-1] == len("".join(logprobs.tokens[:-1]))


def test_logprobs_without_meaning_or_out_of_range_are_400(client: openai.OpenAI) -> None:
    assert error_of(lambda: sampled(client, logprobs=True, extra_body={"nabla": {"method": "nabla", "n": 2}}))["param"] == "logprobs"
    assert error_of(lambda: sampled(client, top_logprobs=2))["param"] == "top_logprobs"
    assert error_of(lambda: sampled(client, logprobs=True, top_logprobs=21))["param"] == "top_logprobs"
    assert error_of(lambda: client.completions.create(model="tiny", prompt="1", max_tokens=2, logprobs=True))["param"] == "logprobs"  # type: ignore[arg-type]
    assert sampled(client).choices[0].logprobs is None
    assert sampled(client, logprobs=False, top_logprobs=0).choices[0].logprobs is None  # neutral values, as before


# --- temperature and top_p ---------------------------------------------------------------
def test_temperature_above_two_is_400(client: openai.OpenAI) -> None:
    error = error_of(lambda: sampled(client, temperature=3))
    assert error["param"] == "temperature" and "less than or equal to 2" in error["message"]


def test_sampling_fields_a_greedy_method_does_not_use_are_reported(client: openai.OpenAI) -> None:
    out = sampled(client, temperature=0.8, top_p=0.5, extra_body={"nabla": {"method": "greedy", "n": 3}})
    ignored = out.model_extra["nabla"]["ignored"]
    assert set(ignored) == {"temperature", "top_p", "nabla.n"} and "greedy" in ignored["temperature"]
    assert sampled(client, temperature=0.8, top_p=0.5).model_extra["nabla"]["ignored"] == {}
    assert set(sampled(client, temperature=0, top_p=0.5).model_extra["nabla"]["ignored"]) == {"top_p"}


# --- unknown and refused fields -----------------------------------------------------------
def test_unknown_fields_are_ignored_with_a_warning(client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nabla_lc.server.protocol"):
        out = sampled(client, seed=3, extra_body={**SAMPLED, "extra_body": {}, "guided_json": {"type": "object"}})
    assert out.model_extra["nabla"]["ignored"] == {"extra_body": "unknown field", "guided_json": "unknown field"}
    assert out.choices[0].message.content == sampled(client, seed=3).choices[0].message.content
    assert any("extra_body" in r.getMessage() and "guided_json" in r.getMessage() for r in caplog.records)


def test_strict_params_refuses_unknown_fields(tiny_engine: Engine) -> None:
    with running_server(tiny_engine, strict_params=True) as base:
        client = openai_client(base)
        error = error_of(lambda: sampled(client, extra_body={"extra_body": {}}))
        assert error["param"] == "extra_body" and error["code"] == "unsupported_field"
        assert sampled(client).choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"extra_body": {"functions": []}}, "functions")],
)
def test_known_fields_the_server_cannot_honour_stay_400(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    assert error_of(lambda: sampled(client, **kwargs))["param"] == param


# --- error params -------------------------------------------------------------------------
def test_error_params_name_the_users_field(url: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    image = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    tokens = {"model": "tiny", "prompt": [1, 2, 3]}
    for path, body, param in (("/chat/completions", image, "messages.0.content"), ("/completions", tokens, "prompt")):
        out = httpx.post(url + path, json=body, headers=headers, timeout=60)
        error = out.json()["error"]
        assert out.status_code == 400 and error["param"] == param and error["message"].startswith(param + ": ")
