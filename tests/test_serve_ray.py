"""``nabla-lc serve --ray --replicas 2``: the server's app on two Ray Serve replicas (conftest's 2-CPU ``ray_cluster``),
each with its own tiny engine, answering the openai client through Ray's HTTP proxy."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'nabla-lc[ray]')")
openai = pytest.importorskip("openai")

from nabla_lc.cli import main  # noqa: E402
from nabla_lc.cluster import worker_shape  # noqa: E402
from nabla_lc.server import ServerSettings  # noqa: E402
from nabla_lc.server.ray_serve import REPLICA_HEADER, application, deploy  # noqa: E402

from .tiny import make_engine  # noqa: E402

API_KEY = "ray-test-key-0123456789"
GREEDY = {"nabla": {"method": "greedy"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_cluster):
    """Two replicas behind Ray Serve's proxy on a loopback port; Serve is shut down after the module."""
    shape = worker_shape(ray_cluster, 2, flag="--replicas")
    port = free_port()
    try:
        deploy(application(make_engine, ServerSettings(api_key=API_KEY, model_name="tiny", max_tokens_cap=64), shape), "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)


def test_replicas_answer_the_openai_client_as_the_engine_would(client: openai.OpenAI) -> None:
    engine = make_engine()
    [expected] = engine.generate([engine.request("2+2?", seed=3, max_new_tokens=12)], engine.config.replace(method="greedy"))
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=12, seed=3, extra_body=GREEDY
    )
    out = raw.parse()
    assert raw.headers[REPLICA_HEADER]
    assert out.choices[0].message.content == expected.text and out.usage.completion_tokens == len(expected.token_ids)
    assert out.model_extra["nabla"]["stats"]["model_calls"] == expected.stats.model_calls
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=12, seed=3, stream=True, extra_body=GREEDY
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text  # SSE through Ray's proxy


def test_requests_spread_over_both_replicas(client: openai.OpenAI) -> None:
    def replica(k: int) -> str:
        raw = client.completions.with_raw_response.create(model="tiny", prompt=f"{k}+1=", max_tokens=4, seed=k, extra_body=GREEDY)
        return raw.headers[REPLICA_HEADER]

    seen: set[str] = set()
    with ThreadPoolExecutor(4) as pool:
        for round_ in range(10):  # why bounded: Ray routes 4 concurrent requests to the less loaded of two replicas
            seen |= set(pool.map(replica, range(4 * round_, 4 * round_ + 4)))
            if len(seen) == 2:
                break
    assert len(seen) == 2


def test_same_auth_and_limits(url: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0).completions.create(model="tiny", prompt="x", max_tokens=65)


def test_cli_ray_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NABLA_LC_API_KEY", API_KEY)
    assert main(["serve", "--replicas", "2"]) == 2
    assert "need --ray" in capsys.readouterr().err
