"""LangChain front-ends over the scripted fake engine: translation, batching, streaming, callbacks, cache."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import LLMResult
from langchain_core.prompts import PromptTemplate
from pydantic import ValidationError

from nabla_lc.config import NablaConfig
from nabla_lc.langchain import ChatNablaReasoner, NablaReasonerLLM

from .fake_engine import FakeEngine


class Recorder(BaseCallbackHandler):
    """Records streamed tokens and the final LLM result."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.results: list[LLMResult] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def llm(engine: FakeEngine) -> NablaReasonerLLM:
    return NablaReasonerLLM(engine=engine)


def decoded_prompt(engine: FakeEngine, call: int = -1, index: int = 0) -> str:
    return engine.policy.tokenizer.decode(engine.calls[call].requests[index].prompt_ids)


# --- construction -------------------------------------------------------------------------
def test_config_keywords_fold_into_config(engine: FakeEngine) -> None:
    llm = NablaReasonerLLM(engine=engine, method="bon", n=4, lr=0.05)
    assert (llm.config.method, llm.config.n, llm.config.lr) == ("bon", 4, 0.05)
    assert llm.config.max_new_tokens == engine.config.max_new_tokens  # the rest comes from the engine


def test_config_keywords_apply_on_top_of_an_explicit_config(engine: FakeEngine) -> None:
    llm = NablaReasonerLLM(engine=engine, config=NablaConfig(method="sc", n=5), n=2)
    assert (llm.config.method, llm.config.n) == ("sc", 2)


def test_with_settings_keeps_this_llms_settings(engine: FakeEngine) -> None:
    llm = NablaReasonerLLM(engine=engine, max_new_tokens=50, system="Be brief.", chat=True)
    bon = llm.with_settings(method="bon", n=4)
    assert bon.engine is engine and bon.system == "Be brief." and bon.model_id == llm.model_id
    assert (bon.config.method, bon.config.n, bon.config.max_new_tokens) == ("bon", 4, 50)
    assert llm.config.method == engine.config.method and engine.config.max_new_tokens == 200  # nothing else changed
    assert bon.invoke("hi") == engine.generate([engine.request("hi", system="Be brief.")], bon.config)[0].text
    with pytest.raises(ValidationError):
        llm.with_settings(n=0)


def test_unknown_argument_is_rejected(engine: FakeEngine) -> None:
    with pytest.raises(ValidationError, match="learning_rate"):
        NablaReasonerLLM(engine=engine, learning_rate=0.1)


def test_invalid_config_value_is_rejected(engine: FakeEngine) -> None:
    with pytest.raises(ValueError, match="NablaConfig.n"):
        NablaReasonerLLM(engine=engine, n=0)


def test_return_trace_needs_trace(engine: FakeEngine) -> None:
    with pytest.raises(ValidationError, match="return_trace"):
        NablaReasonerLLM(engine=engine, trace=False, return_trace=True)


def test_identifying_params_hold_every_config_field(llm: NablaReasonerLLM) -> None:
    params = llm._identifying_params
    assert set(NablaConfig().to_dict()) <= set(params)
    assert params["model_id"] == "fake/char-model"


def test_get_token_ids_uses_the_policy_tokenizer(llm: NablaReasonerLLM) -> None:
    assert llm.get_token_ids("ab") == [97, 98]


# --- invoke, stop, per-call options -----------------------------------------------------------
def test_invoke_returns_the_engine_text_with_the_chat_template(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    text = llm.invoke("What is 2+2?")
    assert isinstance(text, str)
    assert text == "Answer to What is 2+2? (seed 0, sample 0). STOP here. The end."
    assert decoded_prompt(engine) == "<user>What is 2+2?</user><assistant>"
    assert engine.calls[-1].config is llm.config


def test_system_and_plain_prompts(engine: FakeEngine) -> None:
    NablaReasonerLLM(engine=engine, system="Be brief.").invoke("hi")
    assert decoded_prompt(engine) == "<system>Be brief.</system><user>hi</user><assistant>"
    NablaReasonerLLM(engine=engine, chat=False).invoke("hi")
    assert decoded_prompt(engine) == "hi"


def test_stop_truncates_invoke_and_stream(llm: NablaReasonerLLM) -> None:
    text = llm.invoke("q", stop=["STOP"])
    assert text == "Answer to q (seed 0, sample 0). "
    chunks = list(llm.stream("q", stop=["STOP"]))
    assert "".join(chunks) == text
    assert not any("S" in c for c in chunks)  # not even a held-back partial match leaks


def test_call_stop_adds_to_config_stop(engine: FakeEngine) -> None:
    llm = NablaReasonerLLM(engine=engine, stop=("The end",))
    assert llm.invoke("q").endswith("here. ")
    assert llm.invoke("q", stop=["(seed"]) == "Answer to q "
    assert engine.calls[-1].requests[0].stop == ("The end", "(seed")


def test_per_call_options_change_the_output_and_apply_to_that_call_only(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    assert llm.invoke("q", seed=3).startswith("Answer to q (seed 3,")
    assert engine.calls[-1].config.seed == 3
    llm.invoke("q", temperature=0.2, top_k=5)
    assert (engine.calls[-1].config.temperature, engine.calls[-1].config.top_k) == (0.2, 5)
    assert llm.invoke("q").startswith("Answer to q (seed 0,")  # the instance's settings are untouched
    assert llm.bind(max_tokens=6).invoke("q") == "Answer"  # LangChain's name for max_new_tokens
    assert "".join(llm.stream("q", seed=4)).startswith("Answer to q (seed 4,")
    assert asyncio.run(llm.ainvoke("q", seed=5)).startswith("Answer to q (seed 5,")


def test_bad_per_call_options_name_the_field(llm: NablaReasonerLLM) -> None:
    with pytest.raises(TypeError, match="frobnicate"):
        llm.invoke("q", frobnicate=1)
    with pytest.raises(ValueError, match="NablaConfig.temperature"):
        llm.invoke("q", temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.invoke("q", max_tokens=4, max_new_tokens=5)
    chat = ChatNablaReasoner(llm=llm)
    with pytest.raises(TypeError, match="frobnicate"):
        chat.invoke("q", frobnicate=1)


def test_per_call_options_are_in_the_cache_key(engine: FakeEngine) -> None:
    cache = InMemoryCache()
    llm = NablaReasonerLLM(engine=engine, cache=cache)
    three = llm.invoke("q", seed=3)
    assert llm.invoke("q", seed=4) != three
    assert len(engine.calls) == 2
    assert llm.invoke("q", seed=3) == three and llm.bind(seed=3).invoke("q") == three
    assert len(engine.calls) == 2  # repeats hit the cache
    chat = ChatNablaReasoner(llm=NablaReasonerLLM(engine=engine), cache=cache)
    first = chat.invoke("q", seed=3).content
    assert chat.invoke("q", seed=4).content != first
    assert chat.invoke("q", seed=3).content == first
    assert len(engine.calls) == 4


def test_a_string_stop_is_one_stop_string(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    assert llm.invoke("q", stop="here") == "Answer to q (seed 0, sample 0). STOP "  # not cut at the 'e' of "Answer"
    assert engine.calls[-1].requests[0].stop == ("here",)
    chat = ChatNablaReasoner(llm=llm)
    assert chat.invoke("q", stop="here").content == "Answer to q (seed 0, sample 0). STOP "


def test_empty_stop_strings_are_refused(llm: NablaReasonerLLM) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        llm.invoke("q", stop=[""])
    with pytest.raises(ValueError, match="non-empty"):
        ChatNablaReasoner(llm=llm).invoke("q", stop=["x", ""])


def test_front_ends_are_exported_by_the_package(engine: FakeEngine) -> None:
    import nabla_lc

    assert nabla_lc.NablaReasonerLLM is NablaReasonerLLM and nabla_lc.ChatNablaReasoner is ChatNablaReasoner
    with pytest.raises(AttributeError, match="Nope"):
        nabla_lc.Nope  # noqa: B018


def test_langsmith_params_name_the_model_and_the_calls_options(llm: NablaReasonerLLM) -> None:
    chat = ChatNablaReasoner(llm=llm)
    for model in (llm, chat):
        params = model._get_ls_params(temperature=0.1)
        assert params["ls_model_name"] == "fake/char-model"
        assert (params["ls_temperature"], params["ls_max_tokens"]) == (0.1, 200)


def test_generation_info_and_token_usage(engine: FakeEngine) -> None:
    llm = NablaReasonerLLM(engine=engine, return_trace=True)
    result = llm.generate(["q"])
    info = result.generations[0][0].generation_info
    assert info["finish_reason"] == "stop"
    assert {"model_calls", "model_calls_paper", "rollouts", "proposals", "rejections", "rejection_rate", "wall_s"} <= set(info["nabla"])
    assert info["trace"][0]["index"] == 0
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] == len("<user>q</user><assistant>")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "trace" not in NablaReasonerLLM(engine=engine).generate(["q"]).generations[0][0].generation_info


def test_max_new_tokens_gives_length(engine: FakeEngine) -> None:
    result = NablaReasonerLLM(engine=engine, max_new_tokens=6).generate(["q"])
    assert result.generations[0][0].text == "Answer"
    assert result.generations[0][0].generation_info["finish_reason"] == "length"


# --- batching -------------------------------------------------------------------------------
def test_batch_is_one_engine_call(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    prompts = [f"p{i}" for i in range(5)]
    out = llm.batch(prompts)
    assert [len(c.requests) for c in engine.calls] == [5]
    assert out == [llm.invoke(p) for p in prompts]


def test_batch_max_concurrency_chunks(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    llm.batch([f"p{i}" for i in range(5)], config={"max_concurrency": 2})
    assert [len(c.requests) for c in engine.calls] == [2, 2, 1]


# --- streaming and callbacks ---------------------------------------------------------------
def test_stream_equals_invoke_and_callbacks_see_the_chunks(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    recorder = Recorder()
    chunks = list(llm.stream("q", config={"callbacks": [recorder]}))
    assert len(chunks) > 3
    assert "".join(chunks) == llm.invoke("q")
    assert recorder.tokens == chunks
    info = recorder.results[0].generations[0][0].generation_info
    assert info["finish_reason"] == "stop" and "nabla" in info
    assert engine.calls[0].streamed


def test_engine_errors_reach_the_streaming_caller(engine: FakeEngine) -> None:
    def fail(*args: Any) -> str:
        raise RuntimeError("engine broke")

    with pytest.raises(RuntimeError, match="engine broke"):
        list(NablaReasonerLLM(engine=FakeEngine(responder=fail)).stream("q"))


def test_async_invoke_batch_stream_and_events(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    async def run() -> tuple[str, list[str], list[str], list[dict[str, Any]]]:
        text = await llm.ainvoke("q")
        batch = await llm.abatch(["a", "b", "c"])
        chunks = [c async for c in llm.astream("q", stop=["STOP"])]
        events = [e async for e in llm.astream_events("q", version="v2")]
        return text, batch, chunks, events

    text, batch, chunks, events = asyncio.run(run())
    assert text == llm.invoke("q")
    assert batch == [llm.invoke(p) for p in "abc"]
    assert [len(c.requests) for c in engine.calls[:2]] == [1, 3]
    assert "".join(chunks) == llm.invoke("q", stop=["STOP"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_llm_start" and kinds[-1] == "on_llm_end"
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_llm_stream"]
    assert "".join(streamed) == text and len(streamed) > 3


# --- cache, LCEL, threads ------------------------------------------------------------------
def test_cache_hits_on_repeat_and_misses_when_a_parameter_changes(engine: FakeEngine) -> None:
    cache = InMemoryCache()
    llm = NablaReasonerLLM(engine=engine, cache=cache)
    first = llm.invoke("q")
    assert llm.invoke("q") == first
    assert len(engine.calls) == 1
    NablaReasonerLLM(engine=engine, cache=cache, lr=0.02).invoke("q")
    assert len(engine.calls) == 2
    NablaReasonerLLM(engine=engine, cache=cache, method="bon").invoke("q")
    assert len(engine.calls) == 3


def test_lcel_chain(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    chain = PromptTemplate.from_template("Question: {q}") | llm | StrOutputParser()
    assert chain.invoke({"q": "2+2?"}) == llm.invoke("Question: 2+2?")
    assert engine.calls[0].requests[0].reward_prompt == "Question: 2+2?"


def test_threads_each_get_their_own_answer(engine: FakeEngine) -> None:
    engine.delay_s = 0.001  # makes the threads overlap
    llm = NablaReasonerLLM(engine=engine)
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            answers[i] = llm.invoke(f"prompt {i}")
        except BaseException as error:  # why: collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert answers == {i: f"Answer to prompt {i} (seed 0, sample 0). STOP here. The end." for i in range(8)}
    assert engine.max_active == 1  # the engine's lock serialized the calls


# --- baselines through the same object ------------------------------------------------------
def test_bon_returns_the_best_sample_with_the_same_statistics_keys(engine: FakeEngine) -> None:
    bon = NablaReasonerLLM(engine=engine, method="bon", n=3).generate(["q"]).generations[0][0]
    assert engine.calls[-1].config.method == "bon"
    texts = [engine.responder("", "q", 0, k) for k in range(3)]
    assert bon.text == max(texts, key=lambda t: sum(map(ord, t)) % 97)
    assert bon.generation_info["nabla"]["rollouts"] == 3
    nabla = NablaReasonerLLM(engine=engine, method="nabla").generate(["q"]).generations[0][0]
    assert set(bon.generation_info["nabla"]) == set(nabla.generation_info["nabla"])


# --- chat model -------------------------------------------------------------------------------
def test_chat_applies_the_template_and_fills_usage(llm: NablaReasonerLLM, engine: FakeEngine) -> None:
    chat = ChatNablaReasoner(llm=llm)
    message = chat.invoke([SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("hello"), HumanMessage("2+2?")])
    assert decoded_prompt(engine) == (
        "<system>Be brief.</system><user>hi</user><assistant>hello</assistant><user>2+2?</user><assistant>"
    )
    assert engine.calls[-1].requests[0].reward_prompt == "2+2?"
    assert message.content.startswith("Answer to 2+2?")
    usage = message.usage_metadata
    assert usage["input_tokens"] == len(decoded_prompt(engine))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["finish_reason"] == "stop"
    assert "model_calls" in message.response_metadata["nabla"]


def test_chat_uses_the_llm_system_when_messages_have_none(engine: FakeEngine) -> None:
    ChatNablaReasoner(llm=NablaReasonerLLM(engine=engine, system="S")).invoke("hi")
    assert decoded_prompt(engine) == "<system>S</system><user>hi</user><assistant>"


def test_chat_refuses_other_message_types(llm: NablaReasonerLLM) -> None:
    with pytest.raises(ValueError, match="ChatMessage"):
        ChatNablaReasoner(llm=llm).invoke([HumanMessage("hi"), ChatMessage(role="critic", content="x")])


def test_chat_streams_with_stop_and_usage_on_the_last_chunk(llm: NablaReasonerLLM) -> None:
    chat = ChatNablaReasoner(llm=llm)
    recorder = Recorder()
    chunks = list(chat.stream("q", stop=["STOP"], config={"callbacks": [recorder]}))
    text = "".join(c.content for c in chunks)
    assert text == chat.invoke("q", stop=["STOP"]).content == "Answer to q (seed 0, sample 0). "
    assert [c.content for c in chunks] == recorder.tokens
    last = chunks[-1]
    assert last.usage_metadata["output_tokens"] > 0
    assert "nabla" in last.response_metadata
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata == last.usage_metadata


def test_chat_async(llm: NablaReasonerLLM) -> None:
    chat = ChatNablaReasoner(llm=llm)

    async def run() -> tuple[str, str]:
        message = await chat.ainvoke("q")
        chunks = [c async for c in chat.astream("q")]
        return message.content, "".join(c.content for c in chunks)

    invoked, streamed = asyncio.run(run())
    assert invoked == streamed == chat.invoke("q").content
