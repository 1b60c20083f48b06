"""The DSPy LM (DSPy 3.4 engine contract) over the scripted fake engine."""

from __future__ import annotations

import asyncio
import json
import warnings
from typing import Any, Iterator

import dspy
import pydantic
import pytest
from dspy.clients.errors import LMInvalidRequestError, LMUnsupportedFeatureError
from dspy.lm15 import Config, Message, Request, TextPart, UnsupportedFeatureError

from nabla_lc.integrations.dspy import GrammarJSONAdapter, NablaDSPyEngine, server_lm
from nabla_lc.langchain import NablaReasonerLLM
from nabla_lc.tool_calls import tool_call_constraint

from .fake_engine import FakeEngine


def chat_adapter_responder(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
    """Answers in DSPy's ChatAdapter format, with a reasoning field when the signature asks for one."""
    question = user_text.split("[[ ## question ## ]]\n", 1)[-1].split("\n", 1)[0]
    answer = f"[[ ## answer ## ]]\n{question.upper()}\n\n[[ ## completed ## ]]"
    if "[[ ## reasoning ## ]]" in prompt_text:
        return f"[[ ## reasoning ## ]]\nThink about {question}.\n\n{answer}"
    return answer


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(responder=chat_adapter_responder)


@pytest.fixture
def lm(engine: FakeEngine) -> dspy.LM:
    return NablaReasonerLLM(engine=engine).as_dspy_lm(cache=False)


def test_plain_call_has_usage_and_statistics_in_history(lm: dspy.LM, engine: FakeEngine) -> None:
    [text] = lm("hello")
    assert text.startswith("[[ ## answer ## ]]")
    entry = lm.history[-1]
    assert entry["usage"]["prompt_tokens"] == len(engine.calls[0].requests[0].prompt_ids)
    assert entry["usage"]["completion_tokens"] == len(text)
    data = entry["response"].provider_data
    assert {"model_calls", "model_calls_paper", "rollouts"} <= set(data["nabla"])
    assert data["method"] == "nabla"


def test_predict_and_chain_of_thought(lm: dspy.LM, engine: FakeEngine) -> None:
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="abc").answer == "ABC"
        prediction = dspy.ChainOfThought("question -> answer")(question="xyz")
    assert prediction.answer == "XYZ"
    assert prediction.reasoning == "Think about xyz."
    prompt = engine.policy.tokenizer.decode(engine.calls[-1].requests[0].prompt_ids)
    assert prompt.startswith("<system>") and "<user>" in prompt  # the chat template got DSPy's messages


def test_evaluate_with_eight_threads(lm: dspy.LM, engine: FakeEngine) -> None:
    devset = [dspy.Example(question=f"q{i}", answer=f"Q{i}").with_inputs("question") for i in range(16)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer, num_threads=8)
    with dspy.context(lm=lm):
        result = evaluate(dspy.Predict("question -> answer"))
    assert result.score == 100.0
    assert len(engine.calls) == 16 and engine.max_active == 1


def test_n_makes_one_engine_call_per_candidate_with_distinct_seeds(lm: dspy.LM, engine: FakeEngine) -> None:
    outputs = lm("hello", n=3)
    assert len(outputs) == 3 and len(engine.calls) == 3
    assert len({c.requests[0].seed for c in engine.calls}) == 3
    assert lm.history[-1]["usage"]["completion_tokens"] == sum(len(o) for o in outputs)


def test_request_settings_reach_the_engine(lm: dspy.LM, engine: FakeEngine) -> None:
    [text] = lm("hello", seed=7, temperature=0.9, top_p=0.5, max_tokens=10, stop=["##"])
    request, config = engine.calls[0].requests[0], engine.calls[0].config
    assert (request.seed, request.max_new_tokens, request.stop) == (7, 10, ("##",))
    assert (config.temperature, config.top_p) == (0.9, 0.5)
    assert text == "[[ "


def test_nabla_config_fields_per_call_through_config_extensions(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """DSPy's keyword options are OpenAI chat fields; NablaConfig fields travel in a typed Request's extensions."""
    monkeypatch.setattr(dspy, "cache", dspy.clients.Cache(enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None))
    lm = NablaReasonerLLM(engine=engine).as_dspy_lm(cache=True)

    def call(nabla: dict[str, Any], **config: Any) -> Any:
        return lm(Request(model=lm.model, messages=(Message.user("hi"),), config=Config(seed=1, extensions={"nabla": nabla}, **config)))

    call({"method": "bon", "n": 2, "dto_steps": 3}, temperature=0.7)
    config = engine.calls[-1].config
    assert (config.method, config.n, config.dto_steps, config.temperature) == ("bon", 2, 3, 0.7)
    assert lm.history[-1]["response"].provider_data["method"] == "bon"
    call({"method": "bon", "n": 2, "dto_steps": 3}, temperature=0.7)
    assert len(engine.calls) == 1  # the same options: DSPy's cache answers
    call({"method": "bon", "n": 3, "dto_steps": 3}, temperature=0.7)
    assert len(engine.calls) == 2 and engine.calls[-1].config.n == 3  # the options are in the cache key
    for nabla, config, match in [
        ({"dto_stepz": 1}, {}, "dto_stepz"),
        ({"n": 0}, {}, "NablaConfig.n"),
        ({"max_tokens": 5}, {}, r"\['nabla'\].max_tokens: set Config.max_tokens"),
        ({"temperature": 0.3}, {"temperature": 0.5}, "disagrees with Config.temperature"),
    ]:
        with pytest.raises(LMInvalidRequestError, match=match):
            call(nabla, **config)
    with pytest.raises(LMUnsupportedFeatureError, match="foo"):
        lm(Request(model=lm.model, messages=(Message.user("hi"),), config=Config(extensions={"foo": 1})))
    assert len(engine.calls) == 2


def test_unsupported_request_features_are_refused(engine: FakeEngine) -> None:
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    request = Request(model="m", messages=(Message.user("hi"),), config=Config(logprobs=2))
    with pytest.raises(UnsupportedFeatureError, match="logprobs"):
        sync.complete(request)


def test_stream_events_match_complete(engine: FakeEngine) -> None:
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    request = Request(model="m", messages=(Message.user("[[ ## question ## ]]\nabc"),), system="S", config=Config(seed=3))
    events = list(sync.stream(request))
    assert [events[0].type, events[-1].type] == ["start", "end"]
    streamed = "".join(e.delta.text for e in events if e.type == "delta")
    response = sync.complete(request)
    assert streamed == response.text
    streamed_data, data = events[-1].provider_data, response.provider_data
    assert streamed_data["nabla"].pop("wall_s") >= 0 and data["nabla"].pop("wall_s") >= 0
    assert streamed_data == data


def test_async_call(lm: dspy.LM, engine: FakeEngine) -> None:
    [text] = asyncio.run(lm.acall("hello", seed=1))
    assert text.startswith("[[ ## answer ## ]]") and engine.calls[0].requests[0].seed == 1


def test_no_deprecation_warnings(lm: dspy.LM) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with dspy.context(lm=lm):
            dspy.Predict("question -> answer")(question="abc")


# --- tools and response_format ------------------------------------------------------------------
def tool_responder(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
    if "tool returned:" in prompt_text:
        return "It is 579."
    return '<tool_call>\n{"name": "add", "arguments": {"a": 123, "b": 456}}\n</tool_call>'


ADD = {"name": "add", "description": "Add two integers.", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}


def test_tools_reach_the_engine_and_tool_calls_come_back() -> None:
    from dspy.lm15 import FunctionTool, ToolChoice, ToolResultPart

    engine = FakeEngine(responder=tool_responder)
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    tools = (FunctionTool(**ADD),)
    response = sync.complete(Request(model="m", messages=(Message.user("What is 123 + 456?"),), tools=tools))
    [call] = response.message.parts
    assert (call.name, dict(call.input), response.finish_reason) == ("add", {"a": 123, "b": 456}, "tool_call")
    prompt = engine.policy.tokenizer.decode(engine.calls[-1].requests[0].prompt_ids)
    assert prompt.startswith("<system>You can call these tools:")
    assert engine.calls[-1].requests[0].constraint is None
    result = Message(role="tool", parts=(ToolResultPart(call.id, (TextPart("579"),), name="add"),))
    history = (Message.user("What is 123 + 456?"), response.message, result)
    final = sync.complete(Request(model="m", messages=history, tools=tools))
    assert final.text == "It is 579."
    prompt = engine.policy.tokenizer.decode(engine.calls[-1].requests[0].prompt_ids)
    assert '<assistant><tool_call>\n{"name": "add", "arguments": {"a": 123, "b": 456}}\n</tool_call></assistant><user>The add tool returned: 579\nAnswer my question with this result.</user>' in prompt
    assert engine.calls[-1].requests[0].reward_prompt == "What is 123 + 456?"  # the reward sees the question, not the result
    sync.complete(Request(model="m", messages=(Message.user("q"),), tools=tools, config=Config(tool_choice=ToolChoice(mode="required"))))
    assert engine.calls[-1].requests[0].constraint.kind == "ebnf"


MUL = {**ADD, "name": "mul", "description": "Multiply two integers."}


def test_tool_choice_allowed_restricts_the_tools_and_unknown_names_are_refused() -> None:
    from dspy.lm15 import FunctionTool, ToolChoice

    engine = FakeEngine(responder=tool_responder)  # replies with a call of ``add``
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    tools = (FunctionTool(**ADD), FunctionTool(**MUL))

    def complete(choice: ToolChoice) -> tuple[str, str, Any]:
        response = sync.complete(Request(model="m", messages=(Message.user("q"),), tools=tools, config=Config(tool_choice=choice)))
        request = engine.calls[-1].requests[0]
        return engine.policy.tokenizer.decode(request.prompt_ids), response.finish_reason, request.constraint

    prompt, finish, constraint = complete(ToolChoice(mode="required", allowed=("mul",)))
    assert constraint == tool_call_constraint([{"type": "function", "function": MUL}], "mul")  # the grammar permits the allowed tool only
    assert '"name": "mul"' in prompt and '"name": "add"' not in prompt
    assert finish != "tool_call"  # the reply's call of ``add`` is not a call of an allowed tool
    prompt, finish, constraint = complete(ToolChoice(mode="auto", allowed=("add",)))
    assert constraint is None and '"name": "add"' in prompt and '"name": "mul"' not in prompt and finish == "tool_call"
    with pytest.raises(ValueError, match="nope"):  # DSPy's Request checks the names
        complete(ToolChoice(mode="required", allowed=("mul", "nope")))


def test_response_format_is_a_constraint() -> None:
    engine = FakeEngine(responder=lambda *_: '{"answer": 3}')
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    sync.complete(Request(model="m", messages=(Message.user("q"),), config=Config(response_format={"type": "json_schema", "name": "A", "schema": schema})))
    constraint = engine.calls[-1].requests[0].constraint
    assert constraint.kind == "json_schema" and json.loads(constraint.spec) == schema
    sync.complete(Request(model="m", messages=(Message.user("q"),), config=Config(response_format={"type": "json_object"})))
    assert json.loads(engine.calls[-1].requests[0].constraint.spec) == {"type": "object"}


def test_json_adapter_parses_on_the_tiny_model(wide_engine) -> None:
    """The adapter's response_format constrains the tiny random model's reply, so DSPy parses it."""
    lm = NablaReasonerLLM(engine=wide_engine, method="greedy", max_new_tokens=40).as_dspy_lm(cache=False)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        prediction = dspy.Predict("question -> answer: bool")(question="Is 7 odd?")
    assert isinstance(prediction.answer, bool)
    assert json.loads(lm.history[-1]["response"].text) == {"answer": prediction.answer}


def test_grammar_json_adapter_gives_react_a_schema() -> None:
    """JSONAdapter sends ReAct's step JSON mode only (its tool arguments are an open mapping), so a small model's
    reply need not have the fields; GrammarJSONAdapter sends a schema per tool: its name and its arguments'."""

    def reply(prompt: str, user: str, seed: int | None, sample: int) -> str:
        if "next_tool_name" in prompt:
            return '{"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}}'
        return '{"reasoning": "it is 3", "answer": 3}'

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    engine = FakeEngine(responder=reply)
    lm = NablaReasonerLLM(engine=engine).as_dspy_lm(cache=False)
    for adapter, step_format in ((dspy.JSONAdapter(), None), (GrammarJSONAdapter(), "schema")):
        engine.calls.clear()
        with dspy.context(lm=lm, adapter=adapter):
            prediction = dspy.ReAct("question -> answer: int", tools=[add], max_iters=2)(question="What is 1 + 2?")
        assert prediction.answer == 3
        step = json.loads(engine.calls[0].requests[0].constraint.spec)
        if step_format is None:
            assert "properties" not in step  # JSON mode: any object
        else:  # one choice per tool: its name and its own arguments, as DSPy describes them in the instructions
            add_step, finish_step = step["anyOf"]
            assert list(add_step["properties"]) == ["next_thought", "next_tool_name", "next_tool_args"]
            assert [add_step["properties"]["next_tool_name"], finish_step["properties"]["next_tool_name"]] == [{"const": "add"}, {"const": "finish"}]
            assert add_step["properties"]["next_tool_args"]["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
            assert add_step["properties"]["next_tool_args"]["required"] == ["a", "b"] and finish_step["properties"]["next_tool_args"]["properties"] == {}


def test_json_mode_logs_a_hint_naming_grammar_json_adapter(caplog: pytest.LogCaptureFixture) -> None:
    """Where the embedded model's parses failed (ReAct under JSONAdapter, ChatAdapter's fallback): JSON mode."""
    engine = FakeEngine(responder=lambda *_: '{"answer": 3}')
    sync = NablaDSPyEngine(NablaReasonerLLM(engine=engine).settings)
    with caplog.at_level("WARNING", logger="nabla_lc.integrations.dspy"):
        for _ in range(2):
            sync.complete(Request(model="m", messages=(Message.user("q"),), config=Config(response_format={"type": "json_object"})))
        sync.complete(Request(model="m", messages=(Message.user("q"),), config=Config(response_format={"type": "json_schema", "name": "A", "schema": {"type": "object"}})))
    hints = [r.getMessage() for r in caplog.records if "GrammarJSONAdapter" in r.getMessage()]
    assert len(hints) == 1  # once per engine


@pytest.fixture
def dspy_providers() -> Iterator[None]:
    """DSPy's provider registry (process-global) restored after the test to what it was before."""
    from dspy.lm15 import register_provider, registered_providers, unregister_provider

    before = registered_providers()
    yield
    for provider in registered_providers():
        unregister_provider(provider.id)
    for b in before:
        register_provider(b.definition, supports=b.supports, models=dict(b.models), metadata_namespaces=b.metadata_namespaces)
    assert registered_providers() == before


def test_a_server_lm_sends_the_signatures_schema_and_openai_prefixed_lms_do_not(wide_engine, dspy_providers) -> None:
    """``dspy.LM("openai/<id>", api_base=...)`` does not know the server takes schemas; ``server_lm`` declares it,
    so JSONAdapter sends the signature's schema and the server's grammar holds the tiny model's reply to it."""
    from .server_harness import API_KEY, running_server

    with running_server(wide_engine) as url:
        plain = dspy.LM("openai/tiny", api_base=url, api_key=API_KEY, max_tokens=40, cache=False, num_retries=0)
        assert plain.supports_response_schema is False  # DSPy cannot know what a local server serves
        lm = server_lm("tiny", url, API_KEY, max_tokens=40, cache=False, num_retries=0)
        assert lm.supports_response_schema is True
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            prediction = dspy.Predict("question -> answer: bool")(question="Is 7 odd?")
        assert isinstance(prediction.answer, bool)
        sent = lm.history[-1]["kwargs"]["response_format"]
        assert issubclass(sent, pydantic.BaseModel) and list(sent.model_fields) == ["answer"]


def test_react_step_schema_only_for_react_steps_whose_tools_are_described() -> None:
    from nabla_lc.integrations.dspy import react_step_schema

    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        return expression

    step = dspy.ReAct("question -> answer: int", tools=[calc]).react.signature
    [calc_step, _] = react_step_schema(step)["anyOf"]
    assert calc_step["properties"]["next_tool_args"]["properties"]["expression"] == {"type": "string", "minLength": 1}
    assert react_step_schema(dspy.Signature("question -> answer")) is None
    assert react_step_schema(step.with_instructions("no tools described here")) is None  # keeps the open object
