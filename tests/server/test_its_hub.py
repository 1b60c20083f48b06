"""its_hub 1.2's OpenAI-compatible client with SelfConsistency, unmodified, against ``nabla-lc serve`` (issue 33).

its_hub treats an endpoint whose URL lacks "openai" as vLLM and posts a literal top-level ``"extra_body": {}``; it
sends no seed and cannot send the ``nabla`` object, so the server's flags decide the method."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import uvicorn
from its_hub.core.algorithms.self_consistency import SelfConsistency
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

from nabla_lc.cli import main
from nabla_lc.cli import serve as serve_cli
from nabla_lc.server import serving

from ..server_harness import API_KEY, openai_client
from ..tiny import make_engine


@contextmanager
def served(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, *flags: str) -> Iterator[str]:
    """``nabla-lc serve FLAGS`` over the tiny model (its config from the flags), on loopback in a thread."""
    def load(args: Any, config: Any) -> Any:
        engine = make_engine(tokenizer)
        engine.config = config
        return engine

    apps: list[Any] = []
    monkeypatch.setenv("NABLA_LC_API_KEY", API_KEY)
    monkeypatch.setattr(serve_cli, "load_engine", load)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    assert main(["serve", "--served-model-name", "tiny", *flags]) == 0
    with serving(apps[0]) as base:
        yield base


SAMPLING = ("--method", "bon", "--n", "1", "--max-new-tokens", "8")
"""The server's default: one sample a request (Best-of-1)."""


def test_self_consistency_runs_and_votes_over_distinct_samples(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nabla_lc.server.protocol"), served(monkeypatch, tokenizer, *SAMPLING) as url:
        lm = OpenAICompatibleLanguageModel(endpoint=url, api_key=API_KEY, model_name="tiny", max_completion_tokens=8, temperature=1.0, max_tries=1)
        result = SelfConsistency().infer(lm, "What is 2 + 2?", budget=4, return_response_only=False)
    contents = [response["content"] for response in result.responses]
    assert len(contents) == 4 and all(isinstance(c, str) and c for c in contents)
    assert len(set(contents)) > 1  # no seed sent: each request samples afresh
    assert result.the_one["content"] in contents and result.usage.completion_tokens > 0
    warnings = [r.getMessage() for r in caplog.records if "unknown to this server" in r.getMessage()]
    assert len(warnings) == 4 and all("extra_body" in w for w in warnings)


def test_strict_params_refuses_what_its_hub_sends(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    with served(monkeypatch, tokenizer, *SAMPLING, "--strict-params", "--max-choices", "2") as url:
        lm = OpenAICompatibleLanguageModel(endpoint=url, api_key=API_KEY, model_name="tiny", max_completion_tokens=8, max_tries=1)
        with pytest.raises(Exception, match="BadRequestError"):
            SelfConsistency().infer(lm, "What is 2 + 2?", budget=2)
        assert any("extra_body: unsupported field" in r.getMessage() for r in caplog.records)  # its_hub logs the server's error
        client = openai_client(url)
        messages = [{"role": "user", "content": "hi"}]
        assert len(client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, n=2).choices) == 2
        with pytest.raises(Exception, match="cap is 2"):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, n=3)
