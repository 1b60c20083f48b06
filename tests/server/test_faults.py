"""Faulty and hostile requests (issue 34): one request's failure stays its own, bad input is a 400 naming the field,
never a 500, and the connection it came on stays usable."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any, Iterator

import httpx
import pytest

from nabla_lc import Engine
from nabla_lc.server import app as app_module

from ..server_harness import API_KEY, running_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"nabla": {"method": "greedy"}}


def impossible(prefix: str = "") -> dict[str, Any]:
    """A response format whose grammar allows no token once ``prefix`` is written (a string pattern nothing matches)."""
    schema = {"type": "string", "pattern": prefix + "[^\\s\\S]"}
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **GREEDY, **fields}


@pytest.fixture(scope="module")
def url(wide_engine: Engine) -> Iterator[str]:
    with running_server(wide_engine) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    """One keep-alive connection for the module's requests: every error must leave it usable."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        yield client


def streamed(client: httpx.Client, body: dict[str, Any]) -> list[str]:
    """The data lines of a streamed chat completion."""
    with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def in_flight(client: httpx.Client, base: str) -> int:
    text = client.get(base.removesuffix("/v1") + "/metrics").text
    return int(next(line.split()[-1] for line in text.splitlines() if line.startswith("nabla_requests_in_flight")))


def test_an_impossible_grammar_fails_only_its_own_request(url: str, http: httpx.Client, wide_engine: Engine) -> None:
    bodies = [chat(f"question {i}", seed=i) for i in range(6)]
    alone = [http.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"] for body in bodies]
    bad, bad_stream = chat("bad", response_format=impossible()), chat("bad later", response_format=impossible("a"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with wide_engine.lock:  # why: the scheduler waits until all eight are in flight, so they share its batch
            futures = [pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=body, timeout=120) for body in bodies]
            failing = pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=bad, timeout=120)
            failing_stream = pool.submit(streamed, http, bad_stream)
            deadline = time.monotonic() + 120
            while in_flight(http, url) < 8:
                assert time.monotonic() < deadline, "the requests never became in flight together"
                time.sleep(0.02)
        outs = [f.result() for f in futures]
        refused, lines = failing.result(), failing_stream.result()
    assert [out.status_code for out in outs] == [200] * 6
    assert [out.json()["choices"][0]["message"]["content"] for out in outs] == alone
    assert refused.status_code == 400 and "no response satisfies it" in refused.json()["error"]["message"]
    # the streamed one wrote its opening quote and 'a', then failed: an error event, and the stream ends properly
    error = json.loads(lines[-2])["error"]
    assert "no response satisfies it" in error["message"] and error["type"] == "invalid_request_error"
    assert lines[-1] == "[DONE]"
    assert http.post("/chat/completions", json=bodies[0]).json()["choices"][0]["message"]["content"] == alone[0]


def tools(parameters: object) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "f", "parameters": parameters}}]  # fmt: skip


def schema_format(schema: object) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(
    ("fields", "param", "reason"),
    [
        ({"tools": tools({"type": 5}), "tool_choice": "required"}, "tools.1.function.parameters", "Type should be a string"),
        ({"tools": tools({"type": "object", "properties": 5}), "tool_choice": "required"}, "tools.1.function.parameters", "properties must be an object"),
        ({"tools": tools({"type": ["object", 7]}), "tool_choice": "required"}, "tools.1.function.parameters", "type must be a string"),
        ({"tools": tools({"type": "object", "required": [5]}), "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools.1.function.parameters", "does not compile"),
        ({"response_format": schema_format({"type": 5})}, "response_format", "Type should be a string"),
        ({"response_format": schema_format({"type": "array", "items": 5})}, "response_format", "items must be"),
        ({"response_format": schema_format({"type": "string", "pattern": "("})}, "response_format", "Regex"),
    ],
)  # fmt: skip
def test_a_schema_that_does_not_compile_is_400_naming_it(http: httpx.Client, fields: dict[str, Any], param: str, reason: str) -> None:
    out = http.post("/chat/completions", json=chat("x", **fields))
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param and reason in error["message"]
    assert "/project/cpp" not in error["message"]  # xgrammar's C++ location is not the client's business
    assert http.post("/chat/completions", json=chat("x")).status_code == 200  # the same connection still serves


def test_an_unexpected_failure_is_a_counted_500_and_the_connection_survives(
    url: str, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(policy: object, constraint: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "compile_constraint", broken)
    before = http.get(url.removesuffix("/v1") + "/metrics").text
    out = http.post("/chat/completions", json=chat("x", response_format=schema_format({"type": "object"})))
    assert out.status_code == 500 and out.json()["error"]["type"] == "server_error" and "a bug" not in out.text
    metrics = http.get(url.removesuffix("/v1") + "/metrics").text
    line = 'nabla_requests_total{endpoint="/v1/chat/completions",status="500"}'
    count = {text: next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0) for text in (before, metrics)}
    assert count[metrics] == count[before] + 1
    assert http.post("/chat/completions", json=chat("x")).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 1e-45, "nabla": {"method": "bon", "n": 2}}, "temperature"),
        ({"nabla": {"method": "nabla", "n": 2, "tau": 1e-300}}, "nabla.tau"),
        ({"nabla": {"method": "nabla", "n": 2, "st_tau": 1e-300}}, "nabla.st_tau"),
        ({"nabla": {"method": "nabla", "n": 2, "lr": 1e300}}, "nabla.lr"),
        ({"top_p": 1e-300, "nabla": {"method": "bon", "n": 2}}, "top_p"),
    ],
)
def test_extreme_finite_values_are_400_naming_the_field(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    out = http.post("/chat/completions", json={**chat("x"), **fields})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param and param in error["message"]


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("fields", "param", "reason"),
    [
        ({"max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        ({"max_tokens": 10.0}, "max_tokens", "valid integer"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"seed": "3"}, "seed", "valid integer"),
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
        ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": ""}]}, "messages", "empty"),
        ({"response_format": schema_format(nested_schema(200))}, None, "nested too deep"),
    ],
)
def test_wrong_types_and_misleading_cases_are_400_saying_what_is_wrong(
    http: httpx.Client, fields: dict[str, Any], param: str | None, reason: str
) -> None:
    out = http.post("/chat/completions", json={**chat("x"), **fields})
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param and reason in error["message"], error
    assert "no user message" not in error["message"] and "not valid JSON" not in error["message"]


def test_serve_flag_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from nabla_lc.cli import main

    for flags, named in ((["--max-queue", "0"], "--max-queue"), (["--request-timeout", "0"], "--request-timeout")):
        assert main(["serve", "--no-auth", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"nabla-lc: error: {named} is 0") and "greater than" in err, err


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "t7"}}])
def test_a_prompt_too_long_is_refused_before_any_grammar_is_built(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch, tool_choice: object
) -> None:
    from nabla_lc.server import protocol

    built: list[int] = []
    real = protocol.tool_call_constraint
    monkeypatch.setattr(protocol, "tool_call_constraint", lambda tools, choice: built.append(len(tools)) or real(tools, choice))
    many = [{"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object"}}} for i in range(5000)]
    out = http.post("/chat/completions", json=chat("x", tools=many, tool_choice=tool_choice))
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == "messages" and "fills the model's context" in error["message"], error
    assert built == []  # the grammar over 5000 tools (37-39 s on the embedded model) was never started
