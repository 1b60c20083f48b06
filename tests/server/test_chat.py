"""``POST /v1/chat/completions``: the response's shape and text against the engine in-process, the message forms
OpenAI allows, the ∇ extension, and real clients (LangChain's ChatOpenAI, dspy.LM)."""

from __future__ import annotations

import copy

import dspy
import openai
import pytest
from langchain_openai import ChatOpenAI

from nabla_lc import Engine, NablaConfig

from ..fake_engine import FakeEngine
from ..server_harness import API_KEY, GREEDY, alone, openai_client, running_server
from ..test_dspy import chat_adapter_responder
from ..tiny import make_policy


def test_chat_completion_matches_the_engine(client: openai.OpenAI, tiny_engine: Engine) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=12, seed=3, extra_body=GREEDY)
    expected = alone(tiny_engine, "2+2?", seed=3, max_new_tokens=12, method="greedy")
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == expected.stats.prompt_tokens and out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    nabla = out.model_extra["nabla"]
    assert nabla["method"] == "greedy" and nabla["stats"]["model_calls"] == expected.stats.model_calls


def test_chat_response_shape(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_body=GREEDY)
    assert out.id.startswith("chatcmpl-") and isinstance(out.created, int) and out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.logprobs is None and choice.message.role == "assistant"
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


def test_content_parts_and_developer_role_read_as_text_and_system(client: openai.OpenAI) -> None:
    def reply(messages: list[dict]) -> str | None:
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, extra_body=GREEDY).choices[0].message.content

    plain = reply([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}])
    parts = [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]
    assert reply([{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]) == plain
    assert reply([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?", "name": "ann"}]) == plain


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


def test_a_chat_template_error_is_400_naming_messages(tokenizer) -> None:
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}" + strict.chat_template
    engine = Engine(make_policy(strict), strict, None, NablaConfig(method="greedy", max_new_tokens=4))
    with running_server(engine) as url:
        client = openai_client(url)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], max_tokens=2)
        error = caught.value.body
        assert error["param"] == "messages" and "one message only" in error["message"] and error["type"] == "invalid_request_error"
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2).choices


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
