"""Tool calling and structured output on ChatNablaReasoner: scripted replies (the fake engine) for the translation,
the tiny model for the grammar (a forced tool call and a schema always parse), and LangChain's and LangGraph's agents."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from nabla_lc import Engine
from nabla_lc.langchain import ChatNablaReasoner, NablaReasonerLLM
from nabla_lc.tool_calls import ToolCall, conversation, filled, parse_tool_calls, quotation_pattern

from .fake_engine import FakeEngine


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def pick(colour: Literal["red", "blue"], count: Annotated[int, Field(ge=1, le=9)]) -> str:
    """Pick some balls of one colour."""
    return f"{count} {colour}"


class Answer(BaseModel):
    """The final answer."""

    answer: int = Field(ge=0, le=999, description="the number")
    sure: bool


class AnswerDict(TypedDict):
    """The final answer."""

    answer: int
    sure: bool


def scripted(reply: str | None = None) -> ChatNablaReasoner:
    """A chat model whose engine calls ``add`` on the first turn and answers with the tool's result after it."""

    def respond(prompt: str, user: str, seed: int | None, sample: int) -> str:
        if reply is not None:
            return reply
        result = re.search(r"tool returned: (\d+)", prompt)
        if result:
            return f"The sum is {result.group(1)}."
        return 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 123, "b": 456}}\n</tool_call>'

    return ChatNablaReasoner(llm=NablaReasonerLLM(engine=FakeEngine(respond)))


async def alist(items: Any) -> list[Any]:
    return [item async for item in items]


def without_ids(calls: list[Any]) -> list[Any]:
    """Tool calls without their ids (every call gets a fresh one), to compare two decodings of one reply."""
    return [{**c, "id": None} for c in calls]


def prompt_of(chat: ChatNablaReasoner, call: int = -1) -> str:
    engine = chat.llm.engine
    assert isinstance(engine, FakeEngine)
    return engine.policy.tokenizer.decode(engine.calls[call].requests[0].prompt_ids)


# --- the reply's tool calls --------------------------------------------------------------------
def test_a_tool_call_in_the_reply_becomes_an_ai_message_tool_call() -> None:
    chat = scripted()
    reply = chat.bind_tools([add]).invoke("What is 123 + 456?")
    assert reply.content == "Let me add."
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("add", {"a": 123, "b": 456})]
    assert reply.tool_calls[0]["id"].startswith("call_") and reply.invalid_tool_calls == []
    system = prompt_of(chat).split("</system>")[0]
    assert system.startswith("<system>You can call these tools:") and '"name": "add"' in system  # the project's tool prompt


def test_malformed_tool_calls_become_invalid_tool_calls() -> None:
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>\n<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
    reply = scripted(bad).bind_tools([add]).invoke("q")
    assert reply.tool_calls == []
    assert [c["error"].split(":")[0] for c in reply.invalid_tool_calls] == ["not JSON", "names no bound tool (bound"]
    assert reply.invalid_tool_calls[1]["name"] == "mul"


def test_an_unclosed_tool_call_does_not_swallow_the_next_one() -> None:
    tools = [add.tool_call_schema.model_json_schema() | {"name": "add"}]
    reply = parse_tool_calls('<tool_call>{"name": "add", "argu<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', tools)
    assert [c.arguments for c in reply.calls] == [{"a": 1, "b": 2}] and len(reply.invalid) == 1


def test_a_reply_cut_inside_a_tool_call_is_invalid_not_an_error() -> None:
    assert parse_tool_calls('<tool_call>\n{"name": "add", "argu', [add.tool_call_schema.model_json_schema() | {"name": "add"}]).invalid


def test_without_tools_a_tool_call_is_plain_text() -> None:
    reply = scripted().invoke("q")
    assert "<tool_call>" in reply.content and reply.tool_calls == []


def test_tool_calls_round_trip_through_a_tool_message() -> None:
    chat = scripted()
    bound = chat.bind_tools([add])
    first = bound.invoke([HumanMessage("What is 123 + 456?")])
    call = first.tool_calls[0]
    result = ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"], name="add")
    final = bound.invoke([HumanMessage("What is 123 + 456?"), first, result])
    assert final.content == "The sum is 579." and final.tool_calls == []
    prompt = prompt_of(chat)
    assert '<assistant>Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 123, "b": 456}}\n</tool_call></assistant>' in prompt
    assert prompt.endswith("<user>The add tool returned: 579\nAnswer my question with this result.</user><assistant>")
    assert chat.llm.engine.calls[-1].requests[0].reward_prompt == "What is 123 + 456?"  # the reward still sees the question


def test_streaming_with_tools_yields_the_tool_calls() -> None:
    chunks = list(scripted().bind_tools([add]).stream("q"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("add", {"a": 123, "b": 456})]


def test_streaming_with_tools_agrees_with_invoke_on_invalid_tool_calls() -> None:
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>\n<tool_call>{"name": "mul", "arguments": {}}</tool_call>'
    bound = scripted(cut).bind_tools([add])
    invoked = bound.invoke("q")
    assert invoked.tool_calls == [] and len(invoked.invalid_tool_calls) == 2
    [streamed] = list(bound.stream("q"))
    [astreamed] = asyncio.run(alist(bound.astream("q")))
    for chunk in (streamed, astreamed):  # LangChain's lenient parser would make both calls valid-looking
        assert chunk.tool_calls == [] and without_ids(chunk.invalid_tool_calls) == without_ids(invoked.invalid_tool_calls)


def test_invoke_with_tools_under_a_streaming_handler_keeps_invalid_tool_calls() -> None:
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1,\n</tool_call>'
    bound = scripted(cut).bind_tools([add])

    class Streaming(BaseCallbackHandler):  # what makes invoke stream (LangGraph's stream_mode="messages" is one)
        def tap_output_iter(self, run_id: Any, output: Any) -> Any:
            return output

        def tap_output_aiter(self, run_id: Any, output: Any) -> Any:
            return output

    reply = bound.invoke("q", config={"callbacks": [Streaming()]})
    assert reply.tool_calls == [] and without_ids(reply.invalid_tool_calls) == without_ids(bound.invoke("q").invalid_tool_calls)


def test_tool_choice_is_checked_and_forced_choices_are_constraints() -> None:
    chat = scripted()
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([add], tool_choice="mul")
    chat.bind_tools([add]).invoke("q")
    assert chat.llm.engine.calls[-1].requests[0].constraint is None
    for choice in ("add", "any", "required", {"type": "function", "function": {"name": "add"}}, {"type": "any"}):
        chat.bind_tools([add], tool_choice=choice).invoke("q")
        constraint = chat.llm.engine.calls[-1].requests[0].constraint
        assert constraint is not None and constraint.kind == "ebnf" and "<tool_call>" in constraint.spec
    chat.bind_tools([add], tool_choice="none").invoke("q")
    assert "You can call" not in prompt_of(chat)
    with pytest.raises(ValueError, match="no known type"):
        chat.bind_tools([add], tool_choice={"type": "sometimes"})
    with pytest.raises(ValueError, match="no tools are bound"):
        chat.invoke("q", tool_choice="any")


def test_tool_calls_and_options_are_in_the_cache_key() -> None:
    from langchain_core.caches import InMemoryCache

    chat = scripted()
    chat.cache = InMemoryCache()
    chat.invoke("q")
    chat.bind_tools([add]).invoke("q")
    chat.bind_tools([add]).invoke("q")
    assert len(chat.llm.engine.calls) == 2


# --- the grammar on a real (tiny) model ----------------------------------------------------------
@pytest.fixture
def tiny_chat(wide_engine: Engine) -> ChatNablaReasoner:
    return ChatNablaReasoner(llm=NablaReasonerLLM(engine=wide_engine, method="greedy", max_new_tokens=160))


def test_a_forced_tool_call_always_parses(tiny_chat: ChatNablaReasoner) -> None:
    for seed in range(4):
        reply = tiny_chat.bind_tools([add, pick], tool_choice="pick").invoke("balls?", method="bon", n=2, temperature=1.5, seed=seed)
        assert reply.invalid_tool_calls == [] and len(reply.tool_calls) == 1, reply
        assert reply.tool_calls[0]["name"] == "pick" and pick.invoke(reply.tool_calls[0]["args"])[-3:] in ("red", "lue")
    reply = tiny_chat.bind_tools([pick], tool_choice="any").invoke("balls?")
    assert [c["name"] for c in reply.tool_calls] == ["pick"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_always_parses(tiny_chat: ChatNablaReasoner, method: str) -> None:
    schema: Any = Answer if method != "json_mode" else {"type": "object", "properties": {}}
    runnable = tiny_chat.with_structured_output(schema, method=method)  # type: ignore[arg-type]
    for seed in range(3):  # sampled (Best-of-2 at temperature 1.5), so each seed is another reply
        value = runnable.invoke([HumanMessage("What is 2 + 2?")], method="bon", n=2, temperature=1.5, seed=seed)
        if method == "json_mode":
            assert isinstance(value, dict)
        else:
            assert isinstance(value, Answer) and 0 <= value.answer <= 999


def test_structured_output_takes_typeddicts_json_schemas_and_include_raw(tiny_chat: ChatNablaReasoner) -> None:
    value = tiny_chat.with_structured_output(AnswerDict).invoke("2+2?")
    assert set(value) == {"answer", "sure"} and isinstance(value["answer"], int)
    schema = Answer.model_json_schema()
    assert set(tiny_chat.with_structured_output(schema).invoke("2+2?")) == {"answer", "sure"}
    raw = tiny_chat.with_structured_output(Answer, include_raw=True).invoke("2+2?")
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], Answer) and raw["parsing_error"] is None
    assert json.loads(raw["raw"].content) == raw["parsed"].model_dump()
    chat = scripted('{"answer": 4, "sure": true}')
    out = chat.with_structured_output(Answer, include_raw=True).invoke("2+2?", method="bon", n=2)  # per-call options reach the engine
    assert out["parsed"] == Answer(answer=4, sure=True) and chat.llm.engine.calls[-1].config.method == "bon"


def test_structured_output_under_nabla_parses(tiny_chat: ChatNablaReasoner) -> None:
    options = dict(method="nabla", n=2, dto_steps=1, entropy_threshold=-1.0, grad_threshold=-1.0, temperature=1.0)
    assert isinstance(tiny_chat.with_structured_output(Answer).invoke("2+2?", **options), Answer)


# --- agents ------------------------------------------------------------------------------------
def test_create_agent_calls_the_tool_and_answers() -> None:
    from langchain.agents import create_agent

    agent = create_agent(scripted(), tools=[add])
    messages = agent.invoke({"messages": [HumanMessage("What is 123 + 456?")]})["messages"]
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[2].content == "579" and messages[-1].content == "The sum is 579."


def test_langgraph_react_agent_calls_the_tool_and_answers() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # why: LangGraph 1.x marks create_react_agent deprecated in favour of create_agent
        from langgraph.prebuilt import create_react_agent

        agent = create_react_agent(scripted(), tools=[add])
    messages = agent.invoke({"messages": [HumanMessage("What is 123 + 456?")]})["messages"]
    assert messages[-1].content == "The sum is 579." and messages[2].content == "579"


def test_create_agent_with_a_response_format(wide_engine: Engine) -> None:
    from langchain.agents import create_agent

    chat = ChatNablaReasoner(llm=NablaReasonerLLM(engine=wide_engine, method="greedy", max_new_tokens=160))
    agent = create_agent(chat, tools=[pick], response_format=Answer)  # why: bounded arguments, so every forced call ends
    state = agent.invoke({"messages": [SystemMessage("Answer."), HumanMessage("What is 2 + 2?")]})
    assert isinstance(state["structured_response"], Answer), state["messages"]


def test_call_then_answer_forces_a_call_on_the_users_turn_and_text_after_the_result() -> None:
    chat = scripted()
    chat.tool_use = "call_then_answer"
    bound = chat.bind_tools([add])
    first = bound.invoke([HumanMessage("What is 123 + 456?")])
    assert chat.llm.engine.calls[-1].requests[0].constraint is not None  # forced: a grammar
    result = ToolMessage("579", tool_call_id=first.tool_calls[0]["id"], name="add")
    final = bound.invoke([HumanMessage("What is 123 + 456?"), first, result])
    assert chat.llm.engine.calls[-1].requests[0].constraint is None and "You can call" not in prompt_of(chat)  # tools withdrawn
    assert final.content == "The sum is 579."
    chat.tool_use = "model"
    bound.invoke([HumanMessage("What is 123 + 456?")])
    assert chat.llm.engine.calls[-1].requests[0].constraint is None


def test_openai_shaped_response_formats_are_read(tiny_chat: ChatNablaReasoner) -> None:
    """What LangChain's ProviderStrategy binds: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    schema = Answer.model_json_schema()
    reply = tiny_chat.bind(response_format={"type": "json_schema", "json_schema": {"name": "Answer", "schema": schema, "strict": True}}).invoke("2+2?")
    assert Answer.model_validate_json(reply.content)
    assert isinstance(json.loads(tiny_chat.bind(response_format={"type": "json_object"}).invoke("2+2?").content), dict)
    with pytest.raises(ValueError, match="needs a 'schema' object"):
        tiny_chat.bind(response_format={"type": "json_schema", "json_schema": {"name": "x"}}).invoke("2+2?")


def test_tool_results_become_one_user_turn_unless_the_template_has_a_tool_role() -> None:
    calls = [ToolCall("add", {"a": 1, "b": 2}, "c1"), ToolCall("mul", {"a": 3, "b": 4}, "c2")]
    turns = [
        {"role": "user", "content": "What is 1 + 2 and 3 * 4?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"},
        {"role": "tool", "content": "12", "tool_call_id": "c2", "name": ""},
    ]
    plain = conversation(turns, [], native=False)
    assert [t["role"] for t in plain.messages] == ["user", "assistant", "user"]
    assert plain.messages[2]["content"] == "The add tool returned: 3\nThe tool returned: 12\nAnswer my question with these results."
    assert plain.question == "What is 1 + 2 and 3 * 4?" and plain.tools is None
    native = conversation(turns, [], native=True)  # a template with a tool role (Qwen2.5's) renders the results itself
    assert [t["role"] for t in native.messages] == ["user", "assistant", "tool", "tool"]
    assert native.messages[1]["tool_calls"][1]["function"] == {"name": "mul", "arguments": {"a": 3, "b": 4}}
    assert native.question == "What is 1 + 2 and 3 * 4?"


def test_without_a_user_turn_the_reward_sees_the_last_user_role_turn() -> None:
    turns = [{"role": "assistant", "content": "", "tool_calls": [ToolCall("add", {"a": 1, "b": 2}, "c1")]}, {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"}]
    chat = conversation(turns, [], native=False)
    assert chat.question is None
    request = FakeEngine().request_from_messages(chat.messages, question=chat.question)
    assert request.reward_prompt == "The add tool returned: 3\nAnswer my question with this result."


# --- ids, filled arguments, response_format beside tools ------------------------------------------
def test_tool_call_ids_are_unique_across_calls() -> None:
    block = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    ids = [c.id for _ in range(50) for c in parse_tool_calls(block + block, [add_schema()]).calls]
    chat = scripted()
    ids += [chat.bind_tools([add]).invoke("What is 123 + 456?").tool_calls[0]["id"] for _ in range(50)]  # identical calls
    assert len(ids) == 150 and len(set(ids)) == 150 and all(i.startswith("call_") for i in ids)


def add_schema() -> dict[str, Any]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(add)


def test_required_free_strings_are_never_empty_and_quote_the_question_under_call_then_answer() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "note": {"type": "string"},
            "code": {"type": "string", "pattern": "^[a-z]+$"},
            "inner": {"type": "object", "properties": {"deep": {"type": "string"}}, "required": ["deep"]},
        },
        "required": ["text", "code", "inner"],
    }
    plain = filled(parameters)
    assert plain["properties"]["text"] == {"type": "string", "minLength": 1} and plain["properties"]["inner"]["properties"]["deep"]["minLength"] == 1
    assert plain["properties"]["note"] == {"type": "string"} and plain["properties"]["code"] == parameters["properties"]["code"]  # optional, or already bounded
    quoted = filled(parameters, "What is 12 + 34?")["properties"]["text"]["pattern"]
    assert [t for t in ["12 + 34", "34?", "What is 12", "", "2 + 3", "35", "+ 34"] if re.fullmatch(quoted, t)] == ["12 + 34", "34?", "What is 12"]
    assert quotation_pattern("x" * 300) is not None and quotation_pattern(" ".join(["ab"] * 200)) is None  # too long: minLength only


NOTE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 8}}, "required": ["text"]}}}
"""A tool whose one argument is a required string (bounded, so the tiny model's forced call ends within its budget)."""


def test_a_long_message_has_no_quotation_and_the_pattern_is_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    from nabla_lc import tool_calls

    written: list[str] = []
    real = tool_calls._prefixes
    monkeypatch.setattr(tool_calls, "_prefixes", lambda text: written.append(text) or real(text))
    assert quotation_pattern("What is 12 + 34? " * 3000) is None and written == []  # 51,000 characters: its first alternative passes the limit
    pieces = '"'.join(["ab"] * 25_000)  # 25,000 short quotable pieces, each "a(b)?"
    assert quotation_pattern(pieces) is None and len(written) < tool_calls.QUOTE_PATTERN_LIMIT // 6 + 1  # stopped at the limit
    assert len(quotation_pattern("x" * 4999) or "") == 4 * 4999 + 1 == tool_calls.QUOTE_PATTERN_LIMIT - 3 and quotation_pattern("x" * 5000) is None
    for text in ["What is 12 + 34?", "a.b (c) $d-e", "[x] {y} 'z'"]:
        assert [len(tool_calls._prefixes(t)) for t in (text, text[3:])] == [tool_calls._prefixes_length(t) for t in (text, text[3:])]


def test_a_forced_call_quotes_the_message_once_for_every_tool_and_property(monkeypatch: pytest.MonkeyPatch) -> None:
    from nabla_lc import tool_calls

    calls: list[str] = []
    real = tool_calls.quotation_pattern
    monkeypatch.setattr(tool_calls, "quotation_pattern", lambda text: calls.append(text) or real(text))
    parameters = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]}
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}} for name in ("f", "g")]
    assert tool_calls.tool_call_constraint(tools, "any", "What is 12 + 34?") is not None and calls == ["What is 12 + 34?"]


def test_a_forced_call_of_the_tiny_model_fills_and_quotes_its_string_arguments(wide_engine: Engine) -> None:
    chat = ChatNablaReasoner(engine=wide_engine, method="greedy", max_tokens=80)
    for seed in range(3):
        [call] = chat.bind_tools([NOTE], tool_choice="note").invoke("note 2 + 3", method="bon", n=2, temperature=1.5, seed=seed).tool_calls
        assert call["args"]["text"] != ""
    quoting = chat.model_copy(update={"tool_use": "call_then_answer"}).bind_tools([NOTE])
    for seed in range(3):
        [call] = quoting.invoke([HumanMessage("note 2 + 3 now")], method="bon", n=2, temperature=1.5, seed=seed).tool_calls
        assert call["args"]["text"] and call["args"]["text"] in "note 2 + 3 now"


def test_tools_beside_a_response_format_give_a_call_or_the_answer() -> None:
    answer = '{"answer": 579, "sure": true}'
    chat = scripted(answer)
    bound = chat.bind_tools([add], response_format=Answer.model_json_schema())
    assert bound.invoke("What is 123 + 456?").content == answer
    assert chat.llm.engine.calls[-1].requests[0].constraint is not None  # the union of a call and the schema
    chat.tool_use = "call_then_answer"
    reply = scripted().model_copy(update={"tool_use": "call_then_answer"}).bind_tools([add], response_format=Answer.model_json_schema())
    assert reply.invoke([HumanMessage("What is 123 + 456?")]).tool_calls[0]["name"] == "add"
    with pytest.raises(ValueError, match="cannot both constrain"):
        chat.bind_tools([add], tool_choice="add", response_format=Answer.model_json_schema()).invoke("q")


def test_create_agent_with_a_response_format_calls_the_tool_then_answers_in_the_schema() -> None:
    from langchain.agents import create_agent

    def respond(prompt: str, user: str, seed: int | None, sample: int) -> str:
        result = re.search(r"tool returned: (\d+)", prompt)
        return f'{{"answer": {result.group(1)}, "sure": true}}' if result else '<tool_call>\n{"name": "add", "arguments": {"a": 123, "b": 456}}\n</tool_call>'

    chat = ChatNablaReasoner(llm=NablaReasonerLLM(engine=FakeEngine(respond)), tool_use="call_then_answer")
    assert chat.profile is not None and chat.profile.get("structured_output")  # so create_agent takes the provider strategy
    state = create_agent(chat, tools=[add], response_format=Answer).invoke({"messages": [HumanMessage("What is 123 + 456?")]})
    assert state["structured_response"] == Answer(answer=579, sure=True)
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]


def test_structured_output_returns_pydantic_v1_models_and_traces_the_schema(tiny_chat: ChatNablaReasoner) -> None:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.utils.function_calling import convert_to_json_schema
    from pydantic.v1 import BaseModel as BaseModelV1

    class Old(BaseModelV1):
        answer: int
        sure: bool

    assert isinstance(tiny_chat.with_structured_output(Old).invoke("2+2?"), Old)

    class Options(BaseCallbackHandler):
        seen: list[Any]  # set per handler below

        def on_chat_model_start(self, serialized: Any, messages: Any, *, options: Any = None, **kwargs: Any) -> None:
            self.seen.append(options["ls_structured_output_format"])

    for schema in (Answer, AnswerDict):
        for method in ("json_schema", "function_calling", "json_mode"):
            handler = Options()
            handler.seen = []
            tiny_chat.with_structured_output(schema, method=method).invoke("2+2?", config={"callbacks": [handler]})
            assert handler.seen[0]["schema"] == convert_to_json_schema(schema) and handler.seen[0]["kwargs"]["method"] == method


def test_json_mode_holds_the_reply_to_the_schema(tiny_chat: ChatNablaReasoner) -> None:
    for seed in range(3):
        value = tiny_chat.with_structured_output(AnswerDict, method="json_mode").invoke("2+2?", method="bon", n=2, temperature=1.5, seed=seed)
        assert set(value) == {"answer", "sure"}
