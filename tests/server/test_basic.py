"""The plain endpoints (``/health``, ``/v1/models``, ``/metrics``) and the CLI's refusals of an unsafe ``serve``."""

from __future__ import annotations

import httpx
import pytest

from nabla_lc.cli import main

from ..server_harness import AUTH


def test_health_needs_no_key(url: str) -> None:
    out = httpx.get(url.removesuffix("/v1") + "/health")
    assert out.status_code == 200 and out.json() == {"status": "ok"}


def test_models_lists_the_served_model(url: str) -> None:
    out = httpx.get(url + "/models", headers=AUTH)
    assert out.status_code == 200 and out.headers["content-type"].startswith("application/json")
    body = out.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "tiny" and card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]


def test_metrics_count_requests_by_endpoint_and_status(url: str) -> None:
    base = url.removesuffix("/v1")
    wrong_model = httpx.post(url + "/chat/completions", headers=AUTH, json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert wrong_model.status_code == 404
    metrics = httpx.get(base + "/metrics", headers=AUTH)
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'nabla_requests_total{endpoint="/v1/chat/completions",status="404"}' in metrics.text
    assert "nabla_requests_in_flight 0" in metrics.text and "nabla_request_latency_seconds_bucket" in metrics.text
    assert httpx.get(base + "/metrics").status_code == 401


def test_serve_refuses_no_auth_off_loopback_and_a_missing_key(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["serve", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "--no-auth is only allowed with a loopback" in capsys.readouterr().err
    monkeypatch.delenv("NABLA_LC_API_KEY", raising=False)
    assert main(["serve"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert main(["serve", "--no-auth", "--api-key-file", "key.txt"]) == 2
    assert "contradict" in capsys.readouterr().err
