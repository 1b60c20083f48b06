"""its_hub 1.2's OpenAI-compatible client with SelfConsistency, unmodified, against the server (issue 33).

its_hub treats an endpoint whose URL lacks "openai" as vLLM and posts a literal top-level ``"extra_body": {}``; it
sends no seed and cannot send the ``nabla`` object, so the server's defaults decide the method."""

from __future__ import annotations

import logging

import pytest
from its_hub.core.algorithms.self_consistency import SelfConsistency
from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

from ..server_harness import API_KEY, running_server
from ..tiny import make_engine


def test_self_consistency_runs_and_votes_over_distinct_samples(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(tokenizer)
    engine.config = engine.config.replace(method="bon", n=1, max_new_tokens=8)  # the server's default: one sample a request
    with running_server(engine) as url, caplog.at_level(logging.WARNING, logger="nabla_lc.server.protocol"):
        lm = OpenAICompatibleLanguageModel(endpoint=url, api_key=API_KEY, model_name="tiny", max_completion_tokens=8, temperature=1.0, max_tries=1)
        result = SelfConsistency().infer(lm, "What is 2 + 2?", budget=4, return_response_only=False)
    contents = [response["content"] for response in result.responses]
    assert len(contents) == 4 and all(isinstance(c, str) and c for c in contents)
    assert len(set(contents)) > 1  # no seed sent: each request samples afresh
    assert result.the_one["content"] in contents and result.usage.completion_tokens > 0
    warnings = [r.getMessage() for r in caplog.records if "unknown to this server" in r.getMessage()]
    assert len(warnings) == 4 and all("extra_body" in w for w in warnings)
