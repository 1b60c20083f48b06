"""Errors in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``), each naming what was wrong: bad
fields, auth, unknown models and routes, body limits, a full queue, the time limit."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from ..fake_engine import FakeEngine, default_responder
from ..server_harness import API_KEY, AUTH, running_server

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def openai_error(response: httpx.Response, status: int) -> dict[str, str | None]:
    """The error object of ``response``, checked to be OpenAI's shape under ``status``."""
    assert response.status_code == status and response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"] and isinstance(body["error"]["type"], str)
    return body["error"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"n": 99}, "n"),
        ({"extra_body": {"nabla": {"tau": -1}}}, "nabla.tau"),
        ({"extra_body": {"nabla": {"methd": "bon"}}}, "nabla"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
    ],
)
def test_bad_field_is_400_naming_it(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **{"max_tokens": 2, **kwargs})
    error = caught.value.body
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "temperature": -1}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_body_is_400_in_openai_shape(fake_url: str, body: dict, param: str) -> None:
    error = openai_error(httpx.post(fake_url + "/chat/completions", headers=AUTH, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_wrong_key_is_401(url: str) -> None:
    bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert openai_error(httpx.get(url + "/models"), 401)["code"] == "invalid_api_key"
    assert openai_error(httpx.post(url + "/completions", headers={"Authorization": "Basic " + API_KEY}, json=CHAT), 401)


def test_unknown_model_route_and_method_are_openai_errors(fake_url: str) -> None:
    error = openai_error(httpx.post(fake_url + "/chat/completions", headers=AUTH, json={**CHAT, "model": "gpt-4"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found" and "tiny" in error["message"]
    assert openai_error(httpx.post(fake_url + "/embeddings", headers=AUTH, json={"model": "tiny", "input": "x"}), 404)
    assert openai_error(httpx.get(fake_url + "/chat/completions", headers=AUTH), 405)


def test_body_limits_and_broken_json(fake_url: str) -> None:
    big = httpx.post(fake_url + "/completions", headers=AUTH, content=b"{" + b" " * (2 << 20) + b"}")
    assert "limit" in openai_error(big, 413)["message"]
    assert openai_error(httpx.post(fake_url + "/completions", headers=AUTH, content=b"{not json"), 400)["code"] == "invalid_json"


def test_full_queue_is_429_with_retry_after() -> None:
    # the first request holds the only place until the test releases it (no race with its decoding time)
    release = threading.Event()

    def held(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
        if user_text == "slow":
            release.wait(120)
        return default_responder(prompt_text, user_text, seed, sample)

    with running_server(FakeEngine(responder=held), max_queue=1, retry_after_s=7) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "slow"}]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, url + "/chat/completions", headers=AUTH, json=body, timeout=180)
            deadline = time.monotonic() + 120
            while "nabla_requests_in_flight 1" not in httpx.get(url.removesuffix("/v1") + "/metrics", headers=AUTH).text:
                assert time.monotonic() < deadline and not first.done(), "the first request never became in flight"
                time.sleep(0.02)
            second = httpx.post(url + "/chat/completions", headers=AUTH, json={**body, "messages": [{"role": "user", "content": "x"}]})
            assert second.headers["retry-after"] == "7"
            assert openai_error(second, 429)["type"] == "rate_limit_error"
            release.set()
            assert first.result().status_code == 200
        assert httpx.post(url + "/chat/completions", headers=AUTH, json=body).status_code == 200


def test_n_above_the_cap_is_400() -> None:
    with running_server(FakeEngine(), max_n=4) as url:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "q"}]}
        out = httpx.post(url + "/chat/completions", headers=AUTH, json={**body, "nabla": {"method": "bon", "n": 5}}, timeout=30)
        assert openai_error(out, 400)["param"] == "nabla.n"
        assert httpx.post(url + "/chat/completions", headers=AUTH, json={**body, "nabla": {"method": "bon", "n": 4}}, timeout=30).status_code == 200


def test_time_limit_is_504() -> None:
    with running_server(FakeEngine(delay_s=0.2), request_timeout_s=0.3) as url:
        out = httpx.post(url + "/chat/completions", headers=AUTH, json={"model": "tiny", "messages": [{"role": "user", "content": "slow"}]}, timeout=30)
    assert openai_error(out, 504)["type"] == "timeout"


def test_the_responses_api_is_a_404_naming_what_is_served(url: str) -> None:
    llm = ChatOpenAI(base_url=url, api_key=API_KEY, model="tiny", max_tokens=4, max_retries=0, use_responses_api=True)
    with pytest.raises(openai.NotFoundError) as caught:
        llm.invoke("hi")
    error = caught.value.body
    assert error["code"] == "unknown_endpoint" and "Responses API is not implemented" in error["message"]
    assert "POST /v1/chat/completions" in error["message"] and "use_responses_api" in error["message"]
    other = openai_error(httpx.post(url + "/embeddings", headers=AUTH, json={"model": "tiny", "input": "x"}), 404)["message"]
    assert other.startswith("POST /v1/embeddings is not an endpoint") and "POST /v1/completions" in other and "GET /v1/models" in other
