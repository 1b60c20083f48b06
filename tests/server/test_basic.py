"""The plain endpoints (``/health``, ``/v1/models``, ``/metrics``) and the CLI's refusals of an unsafe ``serve``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import uvicorn

from nabla_lc.cli import main
from nabla_lc.cli import serve as serve_cli
from nabla_lc.server import serving

from ..fake_engine import FakeEngine, FakeModel, FakePolicy
from ..server_harness import API_KEY, AUTH


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


def test_a_model_by_id(url: str) -> None:
    assert httpx.get(url + "/models/tiny", headers=AUTH).json() == httpx.get(url + "/models", headers=AUTH).json()["data"][0]
    for unknown in ("gpt-4", "tiny/extra", "%2Froot%2Fmodel"):
        out = httpx.get(url + f"/models/{unknown}", headers=AUTH)
        assert out.status_code == 404 and set(out.json()["error"]) == {"message", "type", "param", "code"}
        assert out.json()["error"]["code"] == "model_not_found" and "tiny" in out.json()["error"]["message"]
    assert httpx.get(url + "/models/tiny").status_code == 401


def served_names(monkeypatch: pytest.MonkeyPatch, name_or_path: str, *flags: str) -> tuple[list[str], int]:
    """What ``nabla-lc serve FLAGS`` over a fake policy named ``name_or_path`` lists in /v1/models, and the status of
    ``GET /v1/models/{that id}`` (the app the CLI builds, served on loopback instead of uvicorn's foreground run)."""
    engine = FakeEngine()
    engine.policy = FakePolicy(model=FakeModel(name_or_path))
    apps = []
    monkeypatch.setenv("NABLA_LC_API_KEY", API_KEY)
    monkeypatch.setattr(serve_cli, "serving_engine", lambda args: engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    assert main(["serve", *flags]) == 0
    with serving(apps[0]) as base:
        ids = [card["id"] for card in httpx.get(base + "/models", headers=AUTH).json()["data"]]
        return ids, httpx.get(base + f"/models/{ids[0]}", headers=AUTH).status_code


def test_served_model_name_and_the_default_short_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cached = tmp_path / ".cache" / "nabla-lc" / "smollm2-135m-instruct-0123456789abcdef"
    cached.mkdir(parents=True)
    assert served_names(monkeypatch, str(cached)) == (["smollm2-135m-instruct"], 200)
    assert served_names(monkeypatch, str(cached), "--served-model-name", "my-model") == (["my-model"], 200)
    assert served_names(monkeypatch, "org/hub-model") == (["org/hub-model"], 200)


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
