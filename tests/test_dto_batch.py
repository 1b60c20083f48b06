"""DTO passes (and scorings, and rollout joins) of several requests in one batched pass: each row gets what its request
gets alone."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from nabla_lc import Engine, NablaConfig, Stats, kv, scheduler
from nabla_lc.engine import dto
from nabla_lc.engine.calls import PassCall, RolloutCall
from nabla_lc.engine.context import DecodingContext
from nabla_lc.engine.dto import DTORun, NonFiniteGradient, PassRequest, run_passes
from nabla_lc.engine.policy import Policy
from nabla_lc.engine.rollout import RolloutRow, Sampling, rollout
from nabla_lc.engine.scoring import ScoreRequest, run_scores
from nabla_lc.rewards.implicit import ImplicitLoRAReward
from nabla_lc.rewards.lora import LoRAReward

from .tiny import make_classifier_reward, make_policy

QUESTIONS = [("What is 3 + 4?", "7"), ("Add 12 and 30, then tell me the sum.", "4"), ("hi", "")]


def _runs(tokenizer, reward_kind: str = "classifier", arch: str = "llama") -> list[DTORun]:
    """DTO runs of three requests whose prefixes and rollouts have different lengths."""
    model = make_policy(tokenizer, arch)
    policy = Policy(model, tokenizer)
    if reward_kind.startswith("classifier"):
        reward = make_classifier_reward(tokenizer, arch, sliding_window=4 if reward_kind == "classifier_sliding" else None)
    else:
        kind, options = {"lora": (LoRAReward, {}), "process": (LoRAReward, {"step_separator": " "}), "implicit": (ImplicitLoRAReward, {})}[reward_kind]
        reward = kind(model, tokenizer, rank=2, **options)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in reward.adapter_parameters():  # a fresh adapter is a no-op (B = 0): give it an effect
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    config = NablaConfig(max_new_tokens=12, reward_weight=2.0)
    runs = []
    for k, (question, start) in enumerate(QUESTIONS):
        prompt = policy.template(question)
        committed = [tokenizer.convert_tokens_to_ids(c) for c in start]
        row = RolloutRow(prompt + committed, committed, 6 + 3 * k, (), torch.Generator().manual_seed(k), Stats())
        r = rollout(policy, [row], Sampling(1.0), keep_logits=True)[0]
        runs.append(DTORun(policy, reward, config, question, prompt + committed, committed, r.tokens, r.logits, Stats()))
    assert len({len(run.prefix_ids) for run in runs}) == 3 and len({len(run.tokens) for run in runs}) > 1
    return runs


@contextlib.contextmanager
def _forwards(module: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the forward passes of ``module`` in the block."""
    count = [0]

    def hook(*_) -> None:
        count[0] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


@pytest.mark.parametrize(("reward_kind", "arch"), [("classifier", "llama"), ("classifier", "qwen2"), ("classifier_sliding", "qwen2"), ("lora", "llama"), ("process", "llama"), ("implicit", "llama")])
def test_a_batched_pass_gives_each_run_its_own_pass_and_counts(tokenizer, reward_kind, arch):
    alone, together = _runs(tokenizer, reward_kind, arch), _runs(tokenizer, reward_kind, arch)
    expected = [run.loss_and_grad(run.hard()) for run in alone]
    for run in together:
        run.prefixes()  # encoded before the passes are counted
    policy, body = together[0].policy.model, together[0].reward.body
    with _forwards(policy) as policy_passes, _forwards(body) as body_passes:
        found = run_passes([PassRequest(run, run.hard()) for run in together])
    assert policy_passes == [1]  # one batched pass of the policy for the three rows
    shared = any(m is body for m in policy.modules())  # the LoRA rewards run on the policy's own model
    reward_passes = body_passes[0] - (policy_passes[0] if shared else 0)
    assert reward_passes == (1 if reward_kind != "implicit" else 2 * len(together))  # the implicit reward: row by row, adapter on and off
    for a, b, run_a, run_b in zip(expected, found, alone, together):
        assert isinstance(b, dto.Pass)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.logp, a.logp, rtol=1e-5, atol=1e-5)
        assert run_b.stats == run_a.stats  # the same passes and tokens, counted on each request
    assert together[0].stats.policy_backward == 1 and together[0].stats.reward_backward > 0  # one pass each, the reward in it


def test_more_rows_than_the_cap_run_as_several_batched_passes(tokenizer, monkeypatch):
    alone, together = _runs(tokenizer), _runs(tokenizer)
    expected = [run.loss_and_grad(run.hard()) for run in alone]
    for run in together:
        run.prefixes()  # encoded before the passes are counted
    monkeypatch.setattr(dto, "PASS_ROWS", 2)
    with _forwards(together[0].policy.model) as policy_passes, _forwards(together[0].reward.body) as reward_passes:
        found = run_passes([PassRequest(run, run.hard()) for run in together])
    assert policy_passes == [2] and reward_passes == [2]  # two rows in one pass, the third alone
    for a, b, run_a, run_b in zip(expected, found, alone, together):
        assert isinstance(b, dto.Pass)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        assert run_b.stats == run_a.stats


def test_a_non_finite_row_fails_alone(tokenizer, monkeypatch):
    runs = _runs(tokenizer)
    real = dto.DTORun.loss

    def poisoned(self, logp, soft):
        loss = real(self, logp, soft)
        return loss * float("nan") if self is runs[1] else loss

    monkeypatch.setattr(dto.DTORun, "loss", poisoned)
    found = run_passes([PassRequest(run, run.hard()) for run in runs])
    assert isinstance(found[1], NonFiniteGradient)
    assert isinstance(found[0], dto.Pass) and isinstance(found[2], dto.Pass)


def test_concurrent_nabla_requests_share_passes_and_decode_as_alone(tokenizer):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=10))
    config = engine.config.replace(method="nabla", n=3, dto_steps=3, grad_threshold=0.0, entropy_threshold=0.0, lr=0.5)
    requests = [engine.request(q, seed=i) for i, (q, _) in enumerate(QUESTIONS * 2)]
    alone = [engine.generate([r], config)[0] for r in requests]
    before = dataclasses.replace(engine.scheduler.stats)
    with engine.lock:  # why: the scheduler waits at its boundary, so every job is admitted at the same one
        futures = [engine.submit([r], config) for r in requests]
    together = [f.result(timeout=300)[0] for f in futures]
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert dataclasses.replace(a.stats, wall_s=0.0) == dataclasses.replace(b.stats, wall_s=0.0)
    passes = engine.scheduler.stats.passes - before.passes
    rows = engine.scheduler.stats.pass_rows - before.pass_rows
    assert 0 < passes < rows  # some of the requests' passes ran in shared batches
    assert rows == sum(r.stats.policy_backward for r in together)


def test_a_request_whose_pass_fails_fails_alone(tokenizer):
    model = make_policy(tokenizer)
    reward = make_classifier_reward(tokenizer)
    real = reward._soft_input

    def failing(prefix, y):
        if prefix.state.prompt == "hi":
            raise RuntimeError("the reward failed on 'hi'")
        return real(prefix, y)

    reward._soft_input = failing  # type: ignore[method-assign]  # the batched and the single-row pass both read it
    engine = Engine(model, tokenizer, reward, NablaConfig(max_new_tokens=10))
    config = engine.config.replace(method="nabla", n=3, dto_steps=2, grad_threshold=0.0, entropy_threshold=0.0)
    requests = [engine.request(q, seed=i) for i, (q, _) in enumerate(QUESTIONS * 2)]
    alone = [engine.generate([r], config)[0] if r.reward_prompt != "hi" else None for r in requests]
    before = dataclasses.replace(engine.scheduler.stats)
    with engine.lock:  # why: every job is admitted at the same boundary, so their first passes run in one batch
        futures = [engine.submit([r], config) for r in requests]
    for expected, future in zip(alone, futures):
        if expected is None:
            with pytest.raises(RuntimeError, match="failed on 'hi'"):
                future.result(timeout=300)
        else:
            found = future.result(timeout=300)[0]
            assert found.token_ids == expected.token_ids
            assert dataclasses.replace(found.stats, wall_s=0.0) == dataclasses.replace(expected.stats, wall_s=0.0)
    assert engine.scheduler.stats.pass_rows - before.pass_rows > engine.scheduler.stats.passes - before.passes  # passes were shared


def test_a_lone_nabla_job_beside_greedy_jobs_does_not_hold_its_passes(tokenizer, monkeypatch):
    engine = Engine(make_policy(tokenizer), tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=10))
    nabla = engine.config.replace(method="nabla", n=3, dto_steps=2, grad_threshold=0.0, entropy_threshold=0.0, gradient_cache=False, probe_reuse=False)
    greedy = engine.config.replace(method="greedy")

    def run(wait: int) -> tuple[int, int, object]:
        """The scheduler steps until the ∇ job is done and until the greedy jobs are, counted from its submission."""
        monkeypatch.setattr(scheduler, "PASS_WAIT_STEPS", wait)
        start, done = engine.scheduler.stats.steps, {}
        with engine.lock:  # why: every job is admitted at the same boundary; no job can finish before its callback is set
            long = [engine.submit([engine.request("a long one", seed=i, max_new_tokens=120)], greedy) for i in range(2)]
            job = engine.submit([engine.request(QUESTIONS[0][0], seed=0)], nabla)
            job.add_done_callback(lambda _: done.setdefault("nabla", engine.scheduler.stats.steps - start))
            long[1].add_done_callback(lambda _: done.setdefault("greedy", engine.scheduler.stats.steps - start))
        result = job.result(timeout=300)[0]
        [f.result(timeout=300) for f in long]
        return done["nabla"], done["greedy"], result

    wait = scheduler.PASS_WAIT_STEPS
    at_once, greedy_done, expected = run(0)
    assert expected.stats.policy_backward > 1 and at_once < greedy_done  # the precondition: its passes ran while rows decoded
    waited, _, result = run(wait)
    assert waited == at_once  # no pass waited for a job that can never join it
    assert result.token_ids == expected.token_ids


def test_stacking_refuses_sliding_window_caches():
    config = Qwen2Config(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        use_sliding_window=True, sliding_window=4, max_window_layers=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=torch.arange(6)[None], cache=cache, use_cache=True)
    with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
        kv.stack([kv.Snapshot.take(cache), kv.Snapshot.take(cache)])


@pytest.mark.parametrize("reward_kind", ["classifier", "implicit"])
def test_scorings_of_several_requests_run_in_one_reward_pass_and_count_as_alone(tokenizer, reward_kind):
    runs = _runs(tokenizer, "classifier" if reward_kind == "classifier" else "implicit")
    reward, policy = runs[0].reward, runs[0].policy
    assert reward is not None
    pairs = [(q, [run.tokens.tolist(), run.tokens.tolist()[: max(1, len(run.tokens) // 2)]]) for (q, _), run in zip(QUESTIONS, runs)]
    engine_ctx = DecodingContext(policy, reward, NablaConfig(), lambda text: None)
    alone_stats = [Stats() for _ in pairs]
    alone = [engine_ctx.score(q, responses, s) for (q, responses), s in zip(pairs, alone_stats)]
    together_stats = [Stats() for _ in pairs]
    with _forwards(reward.body) as passes:
        found = run_scores([ScoreRequest(reward, q, responses, s) for (q, responses), s in zip(pairs, together_stats)])
    shared = reward_kind == "classifier"
    assert passes == ([1] if shared else [2 * len(pairs)])  # one pass for the three requests' six responses (implicit: group by group, adapter on and off)
    for a, b, sa, sb in zip(alone, found, alone_stats, together_stats):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert sb == sa  # the same passes and tokens, counted on each request


@pytest.mark.parametrize(("reward_kind", "arch"), [("classifier", "llama"), ("classifier_sliding", "qwen2"), ("lora", "llama"), ("process", "llama")])
def test_scorings_after_reward_prefixes_equal_whole_scorings_and_count_only_what_follows(tokenizer, reward_kind, arch):
    runs = _runs(tokenizer, reward_kind, arch)
    reward = runs[0].reward
    assert reward is not None
    groups, prefixes = [], []
    for (question, _), run in zip(QUESTIONS, runs):
        committed, tokens = list(run.committed), run.tokens.tolist()
        groups.append(([question] * 2, [committed + tokens, committed + tokens[: max(1, len(tokens) // 2)]]))
        # the first request's prefix is stale (one committed token fewer): what follows it is still exact
        prefixes.append(reward.prepare(question, committed[:-1] if committed and not prefixes else committed))
    whole = reward.score_groups(groups)
    with _forwards(reward.body) as passes:
        after = reward.score_groups(groups, prefixes)
    assert passes == [1]  # every group after its prefix, in one pass
    for w, a, p in zip(whole, after, prefixes):
        torch.testing.assert_close(a.values, w.values, rtol=1e-5, atol=1e-5)
        assert a.passes == w.passes == 2
        assert a.tokens == w.tokens - 2 * p.tokens  # only the slots after the prefix
    # a group that does not continue its prefix (another prompt, other committed tokens) is scored whole; the rest after theirs
    wrong = [reward.prepare("another question", list(runs[0].committed)), reward.prepare(QUESTIONS[1][0], [5, 6]), prefixes[2]]
    with _forwards(reward.body) as passes:
        mixed = reward.score_groups(groups, wrong)
    assert passes == [2]  # one pass for the whole groups, one after the prefixes
    for w, m in zip(whole[:2], mixed[:2]):
        torch.testing.assert_close(m.values, w.values, rtol=1e-5, atol=1e-5)
        assert m.tokens == w.tokens
    assert mixed[2].tokens == after[2].tokens


def test_concurrent_nabla_requests_share_scorings_and_joins(tokenizer):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=10))
    # dto_steps 0: every uncertain position is resampled and compared, so every request scores
    config = engine.config.replace(method="nabla", n=3, dto_steps=0, entropy_threshold=0.0, tau=2.0)
    requests = [engine.request(q, seed=i) for i, (q, _) in enumerate(QUESTIONS * 2)]
    alone = [engine.generate([r], config)[0] for r in requests]
    before = dataclasses.replace(engine.scheduler.stats)
    prefills = [0]

    def count(module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a join encodes prefixes; a decoding step has one token a row
            prefills[0] += 1

    handle = model.register_forward_hook(count, with_kwargs=True)
    try:
        with engine.lock:  # why: the scheduler waits at its boundary, so every job is admitted at the same one
            futures = [engine.submit([r], config) for r in requests]
        together = [f.result(timeout=300)[0] for f in futures]
    finally:
        handle.remove()
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert dataclasses.replace(a.stats, wall_s=0.0) == dataclasses.replace(b.stats, wall_s=0.0)
    stats = engine.scheduler.stats
    scorings, scored = stats.scorings - before.scorings, stats.scoring_rows - before.scoring_rows
    assert scored == sum(r.stats.rollouts - 1 for r in together) > 0  # one scoring per comparison
    assert 0 < scorings < scored  # some requests' scorings ran in one batch
    joined = stats.rows - before.rows
    assert joined == sum(r.stats.rollouts for r in together)
    assert 0 < prefills[0] < joined  # the six first rollouts joined in one encoding (and maybe more later)


def test_a_pass_waits_for_a_job_about_to_decode(tokenizer):
    runs = _runs(tokenizer)
    policy = runs[0].policy
    sched = scheduler.Scheduler(policy, threading.RLock())

    def probe_only(run: DTORun):
        found = yield PassCall([PassRequest(run, run.hard())])
        return found

    def decode_then_probe(run: DTORun):
        yield RolloutCall([RolloutRow(policy.template("hi"), [], 3, (), torch.Generator().manual_seed(0), Stats())], Sampling(1.0))
        found = yield PassCall([PassRequest(run, run.hard())])
        return found

    with sched.lock:  # why: the scheduler waits at its boundary, so both jobs are admitted at the same one
        futures = [sched.submit(probe_only(runs[0]), passes=True)] + [sched.submit(decode_then_probe(run), passes=True) for run in runs[1:]]
    found = [f.result(timeout=60)[0] for f in futures]
    assert all(isinstance(p, dto.Pass) for p in found)
    assert (sched.stats.passes, sched.stats.pass_rows) == (1, 3)  # the first job's pass waited for the others' rollouts
