"""The OpenAI-compatible server, over a tiny model, through real clients: openai, LangChain's ChatOpenAI, dspy.LM."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import sys
import threading
import time

import dspy
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from nabla_lc import Engine, NablaConfig
from nabla_lc.cli import main
from nabla_lc.server import app as app_module

from .fake_engine import FakeEngine, default_responder
from .server_harness import API_KEY, running_server
from .test_dspy import chat_adapter_responder
from .tiny import make_policy

GREEDY = {"nabla": {"method": "greedy"}}


@pytest.fixture(scope="module")
def url(tiny_engine: Engine):
    with running_server(tiny_engine) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)


def alone(engine: Engine, prompt: str, *, chat: bool = True, seed: int | None = None, max_new_tokens: int | None = None, **config: object):
    """The result of the same request decoded in-process."""
    request = engine.request(prompt, chat=chat, seed=seed, max_new_tokens=max_new_tokens)
    [result] = engine.generate([request], engine.config.replace(**config))
    return result


def test_chat_completion_matches_the_engine(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=12, seed=3, extra_body=GREEDY)
    expected = alone(tiny_engine, "2+2?", seed=3, max_new_tokens=12, method="greedy")
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == expected.stats.prompt_tokens and out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    nabla = out.model_extra["nabla"]
    assert nabla["method"] == "greedy" and nabla["stats"]["model_calls"] == expected.stats.model_calls


def test_nabla_request_carries_its_statistics(client: openai.OpenAI, tiny_engine: Engine) -> None:
    options = {"method": "nabla", "n": 2, "dto_steps": 2, "grad_threshold": 0.0, "entropy_threshold": 0.0}
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1+3?"}], max_tokens=8, seed=5, extra_body={"nabla": options})
    expected = alone(tiny_engine, "1+3?", seed=5, max_new_tokens=8, **options)
    assert out.choices[0].message.content == expected.text
    stats = out.model_extra["nabla"]["stats"]
    assert stats["rollouts"] == expected.stats.rollouts <= 2 and stats["dto_runs"] == expected.stats.dto_runs
    assert stats["model_calls"] == expected.stats.model_calls and out.model_extra["nabla"]["n"] == 2


def test_statistics_report_what_ran(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "2+2?"}]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0.9, extra_body={"nabla": {"method": "greedy", "n": 3}})
    assert {k: greedy.model_extra["nabla"][k] for k in ("method", "n", "temperature")} == {"method": "greedy", "n": 1, "temperature": 0.0}
    bon = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0.9, extra_body={"nabla": {"method": "bon", "n": 3}})
    assert {k: bon.model_extra["nabla"][k] for k in ("method", "n", "temperature")} == {"method": "bon", "n": 3, "temperature": 0.9}


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


def test_text_completion_and_stream(client: openai.OpenAI, tiny_engine: Engine) -> None:
    expected = alone(tiny_engine, "abc", chat=False, seed=2, max_new_tokens=10, method="bon", n=2)
    body = {"nabla": {"method": "bon", "n": 2}}
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=10, seed=2, extra_body=body)
    assert out.object == "text_completion" and out.choices[0].text == expected.text
    assert out.model_extra["nabla"]["reward"] == pytest.approx(expected.reward)
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=10, seed=2, stream=True, extra_body=body))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_wrong_key_is_401(url: str) -> None:
    bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert httpx.get(url + "/models").status_code == 401


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"extra_body": {"nabla": {"tau": -1}}}, "nabla.tau"),
        ({"extra_body": {"nabla": {"methd": "bon"}}}, "nabla"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
    ],
)
def test_bad_field_is_400_naming_it(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **{"max_tokens": 2, **kwargs})
    error = caught.value.body
    assert error["param"] == param and param in error["message"]


def test_limits_and_plain_endpoints(url: str, tiny_engine: Engine) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    base = url.removesuffix("/v1")
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/models", headers=auth).json()["data"][0]["id"] == "tiny"
    wrong_model = httpx.post(url + "/chat/completions", headers=auth, json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    big = httpx.post(url + "/completions", headers=auth, content=b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    broken = httpx.post(url + "/completions", headers=auth, content=b"{not json")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    metrics = httpx.get(base + "/metrics", headers=auth).text
    assert 'nabla_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics
    assert "nabla_requests_in_flight 0" in metrics and "nabla_request_latency_seconds_bucket" in metrics


def test_full_queue_is_429_with_retry_after() -> None:
    # the first request holds the only place until the test releases it (no race with its decoding time)
    release = threading.Event()

    def held(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
        if user_text == "slow":
            release.wait(120)
        return default_responder(prompt_text, user_text, seed, sample)

    with running_server(FakeEngine(responder=held), max_queue=1, retry_after_s=7) as url:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "slow"}]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/chat/completions", headers=auth, json=body, timeout=180)
            deadline = time.monotonic() + 120
            while "nabla_requests_in_flight 1" not in httpx.get(url.removesuffix("/v1") + "/metrics", headers=auth).text:
                assert time.monotonic() < deadline and not first.done(), "the first request never became in flight"
                time.sleep(0.02)
            second = httpx.post(url + "/chat/completions", headers=auth, json={**body, "messages": [{"role": "user", "content": "x"}]})
            assert second.status_code == 429 and second.headers["retry-after"] == "7"
            assert second.json()["error"]["type"] == "rate_limit_error"
            release.set()
            assert first.result().status_code == 200
        assert httpx.post(url + "/chat/completions", headers=auth, json=body).status_code == 200


def test_n_above_the_cap_is_400() -> None:
    with running_server(FakeEngine(), max_n=4) as url:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "q"}]}
        out = httpx.post(url + "/chat/completions", headers=auth, json={**body, "nabla": {"method": "bon", "n": 5}}, timeout=30)
        assert out.status_code == 400 and out.json()["error"]["param"] == "nabla.n"
        assert httpx.post(url + "/chat/completions", headers=auth, json={**body, "nabla": {"method": "bon", "n": 4}}, timeout=30).status_code == 200


def test_time_limit_is_504() -> None:
    with running_server(FakeEngine(delay_s=0.2), request_timeout_s=0.3) as url:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        out = httpx.post(url + "/chat/completions", headers=auth, json={"model": "tiny", "messages": [{"role": "user", "content": "slow"}]}, timeout=30)
    assert out.status_code == 504 and out.json()["error"]["type"] == "timeout"


def test_langchain_chat_openai(url: str, tiny_engine: Engine) -> None:
    llm = ChatOpenAI(base_url=url, api_key=API_KEY, model="tiny", max_tokens=10, seed=4, max_retries=0, extra_body=GREEDY)
    result = alone(tiny_engine, "hello", seed=4, max_new_tokens=10, method="greedy")
    expected = result.text
    message = llm.invoke("hello")
    assert message.content == expected and message.usage_metadata["output_tokens"] == len(result.token_ids)
    assert "".join(chunk.content for chunk in llm.stream("hello")) == expected
    outs = llm.batch(["hello", "world", "hello"])
    assert outs[0].content == outs[2].content == expected
    assert outs[1].content == alone(tiny_engine, "world", seed=4, max_new_tokens=10, method="greedy").text


def test_dspy_lm_predict_and_evaluate() -> None:
    engine = FakeEngine(responder=chat_adapter_responder)
    with running_server(engine) as url:
        lm = dspy.LM("openai/tiny", api_base=url, api_key=API_KEY, max_tokens=200, cache=False, num_retries=0,
                     extra_body={"nabla": {"method": "bon", "n": 2}})
        with dspy.context(lm=lm):
            assert dspy.Predict("question -> answer")(question="abc").answer == "ABC"
            devset = [dspy.Example(question=f"q{i}", answer=f"Q{i}").with_inputs("question") for i in range(16)]
            evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer, num_threads=8)
            assert evaluate(dspy.Predict("question -> answer")).score == 100.0
    assert len(engine.calls) == 17 and all(call.config.method == "bon" and call.config.n == 2 for call in engine.calls)


def test_serve_refuses_no_auth_off_loopback_and_a_missing_key(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["serve", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "--no-auth is only allowed with a loopback" in capsys.readouterr().err
    monkeypatch.delenv("NABLA_LC_API_KEY", raising=False)
    assert main(["serve"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main(["serve", "--no-auth", "--api-key-file", "key.txt"]) == 2
    assert "contradict" in capsys.readouterr().err


CALC = {"type": "function", "function": {"name": "calc", "description": "pick", "parameters": {
    "type": "object", "properties": {"op": {"enum": ["add", "mul"]}}, "required": ["op"], "additionalProperties": False}}}


def test_forced_tool_call_and_json_response_format(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "use the tool"}]
    forced = {"type": "function", "function": {"name": "calc"}}
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=80, tools=[CALC], tool_choice=forced, extra_body=GREEDY)
    [call] = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "calc"
    assert json.loads(call.function.arguments)["op"] in ("add", "mul")
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=80, tools=[CALC], tool_choice=forced, stream=True, extra_body=GREEDY,
    ))
    streamed = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in streamed] == [(call.function.name, call.function.arguments)]
    # the call answered by a tool message, then a JSON reply under a schema
    answered = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "42"}]  # fmt: skip
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    out = client.chat.completions.create(
        model="tiny", messages=answered, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}, extra_body=GREEDY,
    )
    assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, tools=[CALC], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.body["param"] == "tool_choice"


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}


def test_grammars_compile_off_the_event_loop(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = app_module.compile_constraint

    def recorded(policy, constraint):
        threads.append(threading.current_thread().name)
        return real(policy, constraint)

    monkeypatch.setattr(app_module, "compile_constraint", recorded)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=20, response_format=SCHEMA_FORMAT, extra_body=GREEDY)
    assert out.choices[0].message.content.startswith("{")
    assert threads and "nabla-server" not in threads  # the loopback server's event loop runs on the thread "nabla-server"


def test_a_missing_xgrammar_is_400_naming_the_field(client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now fails
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, response_format=SCHEMA_FORMAT)
    error = caught.value.body
    assert error["param"] == "response_format" and "xgrammar" in error["message"]


def test_a_chat_template_error_is_400_naming_messages(tokenizer) -> None:
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}" + strict.chat_template
    engine = Engine(make_policy(strict), strict, None, NablaConfig(method="greedy", max_new_tokens=4))
    with running_server(engine) as url:
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], max_tokens=2)
        error = caught.value.body
        assert error["param"] == "messages" and "one message only" in error["message"] and error["type"] == "invalid_request_error"
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2).choices
