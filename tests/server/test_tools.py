"""Tools and structured replies: a forced tool call (a grammar) in OpenAI's message and stream shapes, a tool message
answering it, ``response_format`` JSON schemas, ``tool_choice: none``, and the grammar's compilation off the event loop."""

from __future__ import annotations

import json
import sys
import threading

import openai
import pytest

from nabla_lc.server import app as app_module

from ..server_harness import GREEDY

CALC = {"type": "function", "function": {"name": "calc", "description": "pick", "parameters": {
    "type": "object", "properties": {"op": {"enum": ["add", "mul"]}}, "required": ["op"], "additionalProperties": False}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}


def test_forced_tool_call_and_json_response_format(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "use the tool"}]
    forced = {"type": "function", "function": {"name": "calc"}}
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=80, tools=[CALC], tool_choice=forced, extra_body=GREEDY)
    [call] = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "calc" and call.type == "function" and call.id
    assert json.loads(call.function.arguments)["op"] in ("add", "mul")
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=80, tools=[CALC], tool_choice=forced, stream=True, extra_body=GREEDY,
    ))
    streamed = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [(0, call.function.name, call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
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


def test_tool_choice_none_replies_in_text(fake_client: openai.OpenAI) -> None:
    out = fake_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "q"}], max_tokens=100, seed=7, tools=[CALC], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == "Answer to q (seed 7, sample 0). STOP here. The end."


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "calc"}}, "response_format": SCHEMA_FORMAT}, "response_format"),
        ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"id": "c", "function": {"name": "calc", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "calc", "arguments": "{"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
    ],
)
def test_bad_tool_fields_are_400_naming_them(fake_client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        fake_client.chat.completions.create(**{"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2, **kwargs})
    assert caught.value.body["param"] == param and param in caught.value.body["message"]


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
