"""LangChain front-ends over the real engine (the tiny in-process models of ``tiny_engine``).

Few and short: the fake-engine tests cover the translation; these check that it holds with real decoding.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from nabla_lc.facade import Engine
from nabla_lc.langchain import ChatNablaReasoner, NablaReasonerLLM


@pytest.fixture(scope="module")
def llm(tiny_engine: Engine) -> NablaReasonerLLM:
    return NablaReasonerLLM(engine=tiny_engine, dto_steps=2, max_new_tokens=6)


def test_invoke_returns_text_and_stream_matches(llm: NablaReasonerLLM) -> None:
    text = llm.invoke("hello there")
    assert isinstance(text, str) and text
    chunks = list(llm.stream("hello there"))
    assert "".join(chunks) == text


def test_stop_cuts_invoke_and_stream(llm: NablaReasonerLLM) -> None:
    greedy = NablaReasonerLLM(engine=llm.engine, method="greedy", max_new_tokens=12)
    text = greedy.invoke("hello there")
    stop = text[3:5]
    expected = text[: text.index(stop)]
    assert greedy.invoke("hello there", stop=[stop]) == expected
    assert "".join(greedy.stream("hello there", stop=[stop])) == expected


def test_chat_template_and_usage(llm: NablaReasonerLLM, tiny_engine: Engine) -> None:
    messages = [SystemMessage("be brief"), HumanMessage("2+2?")]
    greedy = NablaReasonerLLM(engine=llm.engine, method="greedy", max_new_tokens=8)
    message = ChatNablaReasoner(llm=greedy).invoke(messages)
    expected = tiny_engine.policy.template_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}])
    assert message.usage_metadata["input_tokens"] == len(expected)
    assert message.usage_metadata["output_tokens"] == message.response_metadata["nabla"]["response_tokens"] > 0


def test_from_pretrained_wires_policy_reward_and_config(monkeypatch: pytest.MonkeyPatch, tiny_engine: Engine) -> None:
    import nabla_lc.models

    loaded = []

    def load_policy(name: str, device: str | None, dtype: object) -> tuple[object, object]:
        loaded.append((name, device))
        return tiny_engine.policy.model, tiny_engine.policy.tokenizer

    monkeypatch.setattr(nabla_lc.models, "load_policy", load_policy)
    llm = NablaReasonerLLM.from_pretrained("tiny/policy", reward=tiny_engine.reward, device="cpu", method="greedy", max_new_tokens=4)
    assert loaded == [("tiny/policy", "cpu")]
    assert (llm.model_id, llm.config.method, llm.engine.reward) == ("tiny/policy", "greedy", tiny_engine.reward)
    assert isinstance(llm.invoke("hi"), str)
