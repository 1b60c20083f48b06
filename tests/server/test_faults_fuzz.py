"""Fuzzing the chat request's JSON (issue 34): whatever a client sends, the answer is never a 500, a stream always
ends with ``[DONE]``, and the server stays healthy for the next request on the same connection."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nabla_lc import Engine, NablaConfig
from nabla_lc.methods import method_names

from ..server_harness import API_KEY, running_server

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=12),
    st.sampled_from([0, 1, -1, 1e-45, 1e-300, 1e300, "10", "yes", "", " "]),
)  # fmt: skip
ANY = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
"""Any JSON value (NaN and infinities too, which the encoder writes as bare words)."""
COST_FIELDS = {"n", "dto_steps", "beam_width", "max_new_tokens", "step_tokens"}
"""NablaConfig fields that set a decoding's cost (kept small, so that every example decodes in well under a second)."""

EXTREMES = st.sampled_from([0.0, 1e-45, 1e-300, 1e300, -1.0, 5e-324])
"""Finite floats at the edges of what fp32 arithmetic survives."""


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid``'s values, and one time in sixteen any JSON value instead, so that most examples get past the checks
    (why 5: hypothesis draws the ends of a range more often than the middle)."""
    return st.tuples(st.integers(min_value=0, max_value=15), valid, ANY).map(lambda t: t[2] if t[0] == 5 else t[1])


def some_of(fields: dict[str, st.SearchStrategy[Any]], most: int) -> st.SearchStrategy[dict[str, Any]]:
    """Up to ``most`` of ``fields``, each drawn from its strategy."""
    names = st.lists(st.sampled_from(sorted(fields)), max_size=most, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))


def config_value(field: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    """Values of a NablaConfig field: of its default's type, small where the field sets a decoding's cost."""
    default = field.default
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(min_value=0, max_value=4) if field.name in COST_FIELDS or default < 100 else st.integers()
    if isinstance(default, float):
        return st.one_of(st.floats(min_value=0, max_value=2), st.just(default), EXTREMES)
    return st.just(default)


SCHEMA = st.one_of(
    st.sampled_from([
        {"type": "object"}, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": 5}, {"type": "object", "properties": 5}, {"type": ["object", 7]}, {"type": "object", "required": [5]},
        {"type": "string", "pattern": "("}, {"type": "string", "pattern": "[^\\s\\S]"}, {"$ref": "#/nowhere"}, {"enum": 5},
    ]),
    st.dictionaries(st.sampled_from(["type", "properties", "required", "items", "enum", "anyOf", "pattern", "$ref"]), ANY, max_size=3),
)
"""JSON schemas: valid ones, ones xgrammar refuses, one no text satisfies, and random ones."""
MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": mostly(st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}), max_size=2)))},
)  # fmt: skip
TOOL = st.fixed_dictionaries(
    {"type": mostly(st.just("function")),
     "function": st.fixed_dictionaries({"name": mostly(st.text(min_size=1, max_size=6)), "parameters": SCHEMA}, optional={"description": mostly(st.text(max_size=8))})},
)  # fmt: skip
NABLA = st.tuples(
    st.fixed_dictionaries({"method": mostly(st.sampled_from(method_names()))}),
    some_of({f.name: mostly(config_value(f)) for f in dataclasses.fields(NablaConfig) if f.name != "method"}, 3),
).map(lambda parts: {**parts[0], **parts[1]})
OPTIONAL = {
    "max_tokens": mostly(st.integers(min_value=1, max_value=6)), "max_completion_tokens": mostly(st.integers(min_value=1, max_value=6)),
    "temperature": mostly(st.one_of(st.floats(min_value=0, max_value=2), EXTREMES)), "top_p": mostly(st.one_of(st.floats(min_value=0.01, max_value=1), EXTREMES)),
    "seed": mostly(st.integers(min_value=0, max_value=2**63)), "stop": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=4)),
    "stream": mostly(st.booleans()), "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "n": mostly(st.integers(min_value=1, max_value=2)), "logprobs": mostly(st.booleans()), "top_logprobs": mostly(st.integers(min_value=0, max_value=3)),
    "tool_choice": mostly(st.one_of(st.sampled_from(["none", "auto", "required"]),
                                    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=6)})}))),
    "response_format": mostly(st.one_of(st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                                        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": SCHEMA})}))),
    "nabla": mostly(NABLA), "user": mostly(st.text(max_size=5)), "presence_penalty": mostly(st.just(0)), "logit_bias": ANY,
    "parallel_tool_calls": mostly(st.booleans()), "unknown_field": ANY,
}  # fmt: skip
TOOLING = st.one_of(
    st.fixed_dictionaries({"tools": mostly(st.lists(TOOL, min_size=1, max_size=3)), "tool_choice": st.sampled_from(["required", "auto"])}),
    st.just({}),
)
"""Many bodies carry tools, most of those forcing a call (a grammar over the tools' parameters)."""
BODY = st.tuples(
    st.fixed_dictionaries({"model": mostly(st.just("tiny")), "messages": mostly(st.lists(MESSAGE, max_size=2).map(lambda m: [*m, {"role": "user", "content": "q"}]))}),
    TOOLING,
    some_of(OPTIONAL, 4),
).map(lambda parts: {**parts[0], **parts[1], **parts[2]})
"""A chat request body: mostly well formed, with some fields any JSON value."""


@pytest.fixture(scope="module")
def http(wide_engine: Engine) -> Iterator[httpx.Client]:
    """One keep-alive connection to a server with small caps, so that no example decodes for long."""
    with running_server(wide_engine, max_tokens_cap=6, max_n=2, max_choices=2) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 4, **fields}


def answer(http: httpx.Client, body: dict[str, Any]) -> tuple[int, str]:
    """The status and text of the answer to ``body``, streamed when it asks to be."""
    content = json.dumps(body).encode()  # why: json= would refuse NaN; a client may well send it
    headers = {"Content-Type": "application/json"}
    if body.get("stream") is True:
        with http.stream("POST", "/chat/completions", content=content, headers=headers) as response:
            return response.status_code, response.read().decode()
    response = http.post("/chat/completions", content=content, headers=headers)
    return response.status_code, response.text


def test_no_request_body_gets_a_500_and_the_server_stays_healthy(http: httpx.Client) -> None:
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=BODY)
    @example(body=chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[^\\s\\S]"}}}))
    @example(body=chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], tool_choice="required"))
    @example(body=chat(temperature=1e-45, nabla={"method": "bon", "n": 2}))
    @example(body=chat(nabla={"method": "nabla", "n": 2, "tau": 1e-300}))
    @example(body=chat(max_tokens="3", stream="yes"))
    def example_body(body: dict[str, Any]) -> None:
        status, text = answer(http, body)
        assert status < 500 and "server_error" not in text, (status, text[:500])
        if status == 200 and body.get("stream") is True:
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]
        elif status != 200:
            assert set(json.loads(text)) == {"error"}

    example_body()  # the cases that once failed, then the generated ones, all on the same keep-alive connection
    ok = http.post("/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "nabla": {"method": "greedy"}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    metrics = http.get(str(http.base_url).removesuffix("/v1/") + "/metrics").text
    assert "nabla_requests_in_flight 0" in metrics and 'status="500"' not in metrics
