"""LangChain's standard unit tests (``langchain-tests``) on ChatNablaReasoner, constructed as the suite constructs
chat models (its standard parameters), over the tiny in-process model; and the same parameters on NablaReasonerLLM,
which the suite has no standard class for.

The integration suite (real replies) is ``tests/test_langchain_standard_integration.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_tests.unit_tests import ChatModelUnitTests

from nabla_lc import Engine
from nabla_lc.langchain import ChatNablaReasoner, NablaReasonerLLM

from .tiny import make_engine

MODEL = "tiny/random-llama"


@functools.cache
def tiny() -> Engine:
    """The tiny random-weight engine (the suite builds its models from class properties, which see no fixtures)."""
    return make_engine()


class Capabilities:
    """What ChatNablaReasoner declares to both standard suites (the suites' defaults cover the rest: tool calling,
    structured output and usage metadata on; images, audio, PDFs off)."""

    @property
    def chat_model_class(self) -> type[ChatNablaReasoner]:
        return ChatNablaReasoner

    @property
    def has_tool_choice(self) -> bool:
        return True  # "any" and a tool's name are grammars

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine serves one model: a per-call model naming another raises ValueError


class TestChatNablaReasonerUnit(Capabilities, ChatModelUnitTests):

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": tiny(), "model": MODEL}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        """The suite's standard parameters without ``api_key``: a local engine has none, and the class refuses
        unknown fields (a misspelt option must not pass silently)."""
        params = super().standard_chat_model_params
        del params["api_key"]
        return params


# --- NablaReasonerLLM under the same standard parameters ------------------------------------------
STANDARD = {"temperature": 0, "max_tokens": 100, "timeout": 60, "stop": [], "max_retries": 2}


def test_the_standard_parameters_map_to_the_engine_or_are_accepted_and_ignored() -> None:
    for cls in (NablaReasonerLLM, ChatNablaReasoner):
        model = cls(engine=tiny(), model=MODEL, **{**STANDARD, "stop": ["END"]})
        llm = model if isinstance(model, NablaReasonerLLM) else model.llm
        assert (llm.model_id, llm.config.temperature, llm.config.max_new_tokens, llm.config.stop) == (MODEL, 0, 100, ("END",))
        assert (llm.timeout, llm.max_retries) == (60, 2)
    with pytest.raises(ValueError, match="timeout"):
        NablaReasonerLLM(engine=tiny(), timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        ChatNablaReasoner(engine=tiny(), max_retries=-1)
    with pytest.raises(ValueError, match="name two models"):
        NablaReasonerLLM(engine=tiny(), model="a", model_id="b")
    with pytest.raises(ValueError, match="api_key"):
        ChatNablaReasoner(engine=tiny(), api_key="x")


def test_keywords_beside_an_llm_change_a_copy_of_it() -> None:
    llm = NablaReasonerLLM(engine=tiny(), method="bon", n=3, system="be brief")
    chat = ChatNablaReasoner(llm=llm, max_tokens=7, temperature=0.9)
    assert (chat.llm.config.method, chat.llm.config.n, chat.llm.system) == ("bon", 3, "be brief")
    assert (chat.llm.config.max_new_tokens, chat.llm.config.temperature) == (7, 0.9)
    assert (llm.config.max_new_tokens, llm.config.temperature) == (24, 0.5)  # the given LLM is unchanged
    assert ChatNablaReasoner(llm=llm, model="renamed").llm.model_id == "renamed" and llm.with_settings(model="b").model_id == "b"


def test_tracing_reports_the_call_as_it_runs() -> None:
    llm = NablaReasonerLLM(engine=tiny(), model=MODEL, temperature=0.7, max_tokens=9, stop=["END"])
    params = llm._get_ls_params(stop=["X"])
    assert params["ls_model_type"] == "llm"
    assert (params["ls_model_name"], params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (MODEL, 0.7, 9, ["END", "X"])
    assert llm._get_ls_params(method="greedy")["ls_temperature"] == 0  # greedy decodes at temperature 0, whatever the config says
    assert llm._get_ls_params(max_tokens=3, model="other")["ls_max_tokens"] == 3
    chat = ChatNablaReasoner(engine=tiny(), method="greedy", temperature=0.5)
    assert chat._get_ls_params()["ls_temperature"] == 0 and chat._get_ls_params(model="x")["ls_model_name"] == "x"


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.mark.parametrize("cls", [NablaReasonerLLM, ChatNablaReasoner])
def test_streaming_decodes_invoke_through_the_stream(cls: type) -> None:
    plain = cls(engine=tiny(), method="greedy", max_tokens=12)
    streaming = cls(engine=tiny(), method="greedy", max_tokens=12, streaming=True)
    handler, quiet = Tokens(), Tokens()
    text = streaming.invoke("hello there", config={"callbacks": [handler]})
    plain.invoke("hello there", config={"callbacks": [quiet]})
    expected = plain.invoke("hello there")
    assert text_of(text) == text_of(expected) and "".join(handler.tokens) == text_of(expected) and len(handler.tokens) > 1
    assert quiet.tokens == []


def text_of(reply: Any) -> str:
    return reply if isinstance(reply, str) else reply.content


@pytest.mark.parametrize("cls", [NablaReasonerLLM, ChatNablaReasoner])
def test_a_per_call_model_must_be_the_served_one(cls: type) -> None:
    model = cls(engine=tiny(), model=MODEL, method="greedy", max_tokens=4)
    assert text_of(model.invoke("hi", model=MODEL)) == text_of(model.invoke("hi"))
    with pytest.raises(ValueError, match="serves the model 'tiny/random-llama'"):
        model.invoke("hi", model="gpt-4o")
