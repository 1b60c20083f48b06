"""lm-eval's ``local-completions`` and ``local-chat-completions`` against the server on a local arith task, with an
accuracy band, as vLLM's tests/entrypoints/openai/correctness/test_lmeval.py runs lm-eval against its server.

A scripted engine answers sums right and products wrong, so lm-eval's accuracy must be the share of sums; the task
is written from the bench's own questions (no dataset download) and graded by the bench's own check. The figure on
the embedded model, beside the bench's, is in docs/server.md ("lm-eval"), from docs/lmeval_arith.py."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from nabla_lc import NablaConfig
from nabla_lc.bench import arith, lmeval

from ..fake_engine import FakeEngine
from ..server_harness import API_KEY, AUTH, running_server

QUESTIONS = 12
BATCH = 4
RTOL = 0.01


def sums_right(prompt_text: str, user_text: str, seed: int | None, sample: int) -> str:
    """A reply to the arith question in ``user_text`` (the user message, or the whole text prompt): right for a sum,
    one too many for a product."""
    question = re.search(r"What is (\d+) (\+|times) (\d+)\?", user_text)
    assert question is not None, user_text
    a, op, b = int(question[1]), question[2], int(question[3])
    return f"The answer is \\boxed{{{a + b if op == '+' else a * b + 1}}}."


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The task directory over the first test questions, and the accuracy a sums-right engine has on them."""
    problems = arith.make_problems("test", QUESTIONS)
    expected = sum("+" in p.problem for p in problems) / len(problems)
    assert 0 < expected < 1  # both kinds occur, so a wrong grading or a lost question moves the accuracy
    return lmeval.write_task(tmp_path_factory.mktemp("lmeval"), problems), expected


@pytest.mark.parametrize("mode", ["text", "chat"])
def test_lm_eval_accuracy(mode: lmeval.Mode, task: tuple[Path, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory, expected = task
    with running_server(FakeEngine(responder=sums_right, config=NablaConfig(method="greedy", max_new_tokens=64))) as url:
        measured = lmeval.evaluate(mode, url, "tiny", API_KEY, directory, batch_size=BATCH)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers=AUTH).text
    assert measured["n"] == QUESTIONS
    assert expected - RTOL < measured["acc"] < expected + RTOL, f"expected {expected}, measured {measured['acc']}"
    # local-completions sends BATCH prompts per request (a list of prompts); local-chat-completions one conversation
    requests = QUESTIONS // BATCH if mode == "text" else QUESTIONS
    assert f'nabla_requests_total{{endpoint="/v1{lmeval.ENDPOINTS[mode]}",status="200"}} {requests}' in metrics
