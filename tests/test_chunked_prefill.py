"""Chunked prefill (issue 34): a long prompt is encoded a chunk a step between the other rows' tokens, with the same
outcome as encoding it at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nabla_lc import Engine


@pytest.fixture
def chunked(wide_engine: Engine) -> Iterator[Engine]:
    wide_engine.scheduler.prefill_chunk = 16
    try:
        yield wide_engine
    finally:
        wide_engine.scheduler.prefill_chunk = None


@pytest.mark.parametrize("method", ["greedy", "bon"])
def test_a_long_prompt_prefilled_in_chunks_lets_a_short_one_finish_first_with_the_same_outcomes(chunked: Engine, method: str) -> None:
    config = chunked.config.replace(method=method, n=2, max_new_tokens=8)
    long, short = chunked.request("abc def " * 60, seed=1), chunked.request("q?", seed=2)
    chunked.scheduler.prefill_chunk = None
    alone = [chunked.generate([request], config)[0] for request in (long, short)]
    chunked.scheduler.prefill_chunk = 16
    order: list[str] = []
    with chunked.lock:  # why: both are admitted before the scheduler starts, so they share its batch
        futures = [chunked.submit([request], config, on_token=lambda i, t, who=who: order.append(who)) for request, who in ((long, "L"), (short, "S"))]
    together = [future.result()[0] for future in futures]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.model_calls for r in together] == [r.stats.model_calls for r in alone]  # a chunked prefill counts as one pass
    assert len(long.prompt_ids) > 30 * 16 and "L" not in order[: order.count("S")]  # the short one's tokens all came first


def test_a_request_cancelled_while_its_prompt_is_prefilled_leaves(chunked: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from nabla_lc.engine import rollout

    config = chunked.config.replace(method="greedy", max_new_tokens=8)
    long, short = chunked.request("abc def " * 60, seed=1), chunked.request("q?", seed=2)
    chunks: list[int] = []
    real = rollout._Prefill.advance
    monkeypatch.setattr(rollout._Prefill, "advance", lambda self, policy, n: chunks.append(len(self.row.prefix)) or real(self, policy, n))
    futures: list = []
    seen: list[str] = []

    def cancel_at_the_fourth(i: int, text: str) -> None:  # the short one's 4th token cancels the long one, mid-prefill
        seen.append(text)
        if len(seen) == 4:
            futures[0].cancel()

    with chunked.lock:
        futures.append(chunked.submit([long], config))
        futures.append(chunked.submit([short], config, on_token=cancel_at_the_fourth))
    assert futures[1].result()[0].token_ids == chunked.generate([short], config)[0].token_ids
    assert futures[0].cancelled() and 0 < chunks.count(len(long.prompt_ids)) < len(long.prompt_ids) // 16  # it left mid-prefill
    assert chunked.generate([long], config)[0].token_ids  # and the scheduler goes on serving long prompts


def test_a_step_that_only_prefills_is_not_counted_as_a_decoding_step(chunked: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from nabla_lc.scheduler import SchedulerStats

    config = chunked.config.replace(method="greedy", max_new_tokens=4)
    long = chunked.request("abc def " * 60, seed=1)
    monkeypatch.setattr(chunked.scheduler, "stats", SchedulerStats())  # why: the shared engine's sizes keep only the last 1000
    stats = chunked.scheduler.stats
    result = chunked.generate([long], config)[0]
    assert len(long.prompt_ids) > 30 * 16 and 0 < stats.steps <= len(result.token_ids)  # the ~30 chunks are no steps
    assert len(stats.sizes) == stats.steps and 0 not in stats.sizes


def test_serve_takes_the_chunk_size_and_refuses_one_below_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, wide_engine: Engine) -> None:
    import argparse

    from nabla_lc.cli import main, serve

    assert main(["serve", "--no-auth", "--prefill-chunk", "0"]) == 2
    assert capsys.readouterr().err.strip() == "nabla-lc: error: --prefill-chunk is 0: it must be at least 1 token"
    monkeypatch.setattr(serve, "config_from_args", lambda args: wide_engine.config)
    monkeypatch.setattr(serve, "load_engine", lambda args, config: wide_engine)
    try:
        assert serve.serving_engine(argparse.Namespace(prefill_chunk=64)).scheduler.prefill_chunk == 64
    finally:
        wide_engine.scheduler.prefill_chunk = None
