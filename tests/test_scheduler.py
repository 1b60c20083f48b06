"""Continuous batching: concurrent callers share rollout batches, every output is the one it gets alone, and a
cancelled call stops decoding at the next token."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx
import openai
import pytest

from nabla_lc import Engine, NablaConfig
from nabla_lc.langchain import ChatNablaReasoner, NablaReasonerLLM

from .server_harness import API_KEY, running_server
from .tiny import make_classifier_reward, make_policy

SEARCH = {"dto_steps": 2, "grad_threshold": 0.0, "entropy_threshold": 0.0}
MIXED: list[dict[str, object]] = [
    {"method": "greedy"},
    {"method": "nabla", "n": 2, **SEARCH},
    {"method": "bon", "n": 3},
    {"method": "sc", "n": 2, "temperature": 0.9},
    {"method": "nabla", "n": 3, **SEARCH, "temperature": 0.7},
    {"method": "weighted_bon", "n": 2},
]
PROMPTS = ["What is 2 + 3?", "Add 7 and 8.", "hello", "1+1=", "Name a colour."]


def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def same(a, b) -> bool:
    return a.token_ids == b.token_ids and a.text == b.text and dataclasses.replace(a.stats, wall_s=0.0) == dataclasses.replace(b.stats, wall_s=0.0)


def test_threads_share_batches_and_get_their_own_outputs(tiny_engine: Engine) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 3, MIXED[i % len(MIXED)]) for i in range(12)]
    requests = [tiny_engine.request(p, seed=seed, max_new_tokens=12) for p, seed, _ in jobs]
    configs = [tiny_engine.config.replace(**options) for _, _, options in jobs]
    alone = [tiny_engine.generate([r], c)[0] for r, c in zip(requests, configs)]
    before = dataclasses.replace(tiny_engine.scheduler.stats)
    with tiny_engine.lock:  # why: the scheduler waits at its boundary, so every job is admitted at the same one
        futures = [tiny_engine.submit([r], c) for r, c in zip(requests, configs)]
    together = [f.result(timeout=120)[0] for f in futures]
    assert all(same(a, b) for a, b in zip(alone, together))
    stats = tiny_engine.scheduler.stats
    assert max(stats.sizes[-(stats.steps - before.steps):]) >= 4  # jobs of one sampling setting shared a batch
    with ThreadPoolExecutor(6) as pool:  # plain generate calls from threads
        threaded = list(pool.map(lambda rc: tiny_engine.generate([rc[0]], rc[1])[0], zip(requests, configs)))
    assert all(same(a, b) for a, b in zip(alone, threaded))


def test_ainvoke_abatch_share_the_scheduler_and_cancelling_stops_decoding(tokenizer) -> None:
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(method="greedy", max_new_tokens=400))
    request = engine.request("a long one", seed=0)
    full = engine.generate([request])[0]
    assert full.finish_reason == "length"  # the precondition: alone it decodes all 400 tokens
    llm = NablaReasonerLLM(engine=engine)
    chat = ChatNablaReasoner(llm=llm)
    expected = [engine.generate([engine.request(p, seed=0, max_new_tokens=8)])[0].text for p in PROMPTS[:3]]
    outs = asyncio.run(llm.bind(max_tokens=8).abatch(PROMPTS[:3]))
    assert outs == expected

    gate, forwards = threading.Event(), [0]

    def hold(module, args, output) -> None:
        forwards[0] += 1
        if forwards[0] == 6:
            gate.wait(60)

    handle = model.register_forward_hook(hold)
    try:
        async def cancel_midway() -> None:
            task = asyncio.create_task(chat.ainvoke("a long one"))
            await asyncio.to_thread(until, lambda: forwards[0] >= 6, "the decoding to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        tokens = engine.scheduler.stats.tokens
        asyncio.run(cancel_midway())
        gate.set()
        until(lambda: engine.scheduler.stats.cancelled == 1, "the scheduler to drop the cancelled job")
    finally:
        handle.remove()
    assert engine.scheduler.stats.tokens - tokens <= 6 < 400


def test_sixteen_clients_get_what_each_request_gets_alone(tiny_engine: Engine) -> None:
    cases = [(c, k) for c in range(16) for k in range(4)]

    def body(c: int, k: int) -> tuple[str, int, dict[str, object]]:
        return PROMPTS[(c + k) % len(PROMPTS)], (c * 7 + k) % 5, MIXED[(c + 2 * k) % len(MIXED)]

    with running_server(tiny_engine, max_queue=64) as url:
        client = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)

        def send(c: int, k: int) -> str | None:
            prompt, seed, options = body(c, k)
            out = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=10, seed=seed, extra_body={"nabla": options}
            )
            return out.choices[0].message.content

        def client_run(c: int) -> list[str | None]:
            return [send(c, k) for k in range(4)]

        with ThreadPoolExecutor(16) as pool:
            served = [text for texts in pool.map(client_run, range(16)) for text in texts]
        for (c, k), text in zip(cases, served):
            prompt, seed, options = body(c, k)
            request = tiny_engine.request_from_messages([{"role": "user", "content": prompt}], seed=seed, max_new_tokens=10)
            assert text == tiny_engine.generate([request], tiny_engine.config.replace(**options))[0].text, (c, k)


def test_a_client_that_disconnects_mid_stream_frees_its_rows(tokenizer) -> None:
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, None, NablaConfig(method="greedy", max_new_tokens=400))
    gate, forwards = threading.Event(), [0]

    def hold(module, args, output) -> None:
        forwards[0] += 1
        if forwards[0] == 8:
            gate.wait(60)

    handle = model.register_forward_hook(hold)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a long one"}], "stream": True, "max_tokens": 400, "seed": 0}
    try:
        with running_server(engine) as url:
            auth = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.stream("POST", url + "/chat/completions", headers=auth, json=body, timeout=60) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            until(lambda: 'status="499"' in httpx.get(url.removesuffix("/v1") + "/metrics", headers=auth).text, "the server to see the disconnect")
            gate.set()
            until(lambda: engine.scheduler.stats.cancelled == 1, "the scheduler to drop the request")
            assert engine.scheduler.stats.tokens <= 8 < 400
            after = httpx.post(url + "/chat/completions", headers=auth, json={**body, "stream": False, "max_tokens": 5}, timeout=60)
            assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 5
    finally:
        gate.set()
        handle.remove()


def test_a_request_joins_a_running_rollout_at_a_token_boundary(tokenizer) -> None:
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, None, NablaConfig(method="greedy", max_new_tokens=300))
    long, short = engine.request("a long one", seed=0), engine.request("hi", seed=1, max_new_tokens=5)
    config = engine.config  # greedy: one sampling setting for both
    long_alone, short_alone = engine.generate([long], config)[0], engine.generate([short], config)[0]
    gate, forwards = threading.Event(), [0]

    def hold(module, args, output) -> None:
        forwards[0] += 1
        if forwards[0] == 10:
            gate.wait(60)

    handle = model.register_forward_hook(hold)
    try:
        first = engine.submit([long], config)
        until(lambda: forwards[0] >= 10, "the long rollout to run")
        second = engine.submit([short], config)
        gate.set()
        short_result = second.result(timeout=60)[0]
        long_result = first.result(timeout=120)[0]
    finally:
        gate.set()
        handle.remove()
    assert long_alone.finish_reason == "length" and len(long_alone.token_ids) > 100
    assert same(long_result, long_alone) and same(short_result, short_alone)
    # the short request joined the long one's batch (two rows in a step; alone, each had one) and left it first
    assert engine.scheduler.stats.max_rows == 2 and len(short_result.token_ids) < len(long_result.token_ids)


def test_jobs_admitted_together_join_in_one_encoding_and_a_failing_one_fails_alone(tokenizer) -> None:
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, None, NablaConfig(method="greedy", max_new_tokens=6))
    marker = tokenizer.convert_tokens_to_ids("!")
    prompts = ["What is 2 + 3?", "hi!", "Add 7 and 8."]
    requests = [engine.request(p, seed=i) for i, p in enumerate(prompts)]
    alone = [engine.generate([r])[0] for r in requests[::2]]
    prefills: list[int] = []

    def encode(module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a join's encoding (a decoding step has one token a row)
            prefills.append(ids.shape[0])
            if bool((ids == marker).any()):
                raise RuntimeError("this prompt cannot be encoded")

    handle = model.register_forward_hook(encode, with_kwargs=True)
    try:
        with engine.lock:  # why: the scheduler waits at its boundary, so every job is admitted at the same one
            futures = [engine.submit([r]) for r in requests]
        with pytest.raises(RuntimeError, match="cannot be encoded"):
            futures[1].result(timeout=60)
        found = [futures[0].result(timeout=60)[0], futures[2].result(timeout=60)[0]]
    finally:
        handle.remove()
    assert prefills == [3, 1, 1, 1]  # one encoding of the three rows; it failed, so each job joined alone
    assert all(same(a, b) for a, b in zip(alone, found))
