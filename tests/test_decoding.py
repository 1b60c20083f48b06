"""Decoder and baselines: acceptance rule, budget, termination, accounting, seeds, stop strings."""

import dataclasses
from collections import Counter

import pytest
import torch

from nabla_lc import ConfigError, Engine, NablaConfig, kv
from nabla_lc.engine import rollout as rollout_module
from nabla_lc.engine.rollout import filter_logits
from nabla_lc.rewards.base import NoGradientError, RewardAdapter, Scores

from .tiny import LinearReward, make_classifier_reward, make_policy

PROMPTS = ["What is 2 + 3?", "What is 4 * 5?", "Add 7 and 8."]
SEARCH = dict(entropy_threshold=0.0, grad_threshold=0.0, dto_steps=3)  # optimize every position


def _engine(tokenizer, reward=None, arch="llama", **cfg):
    model = make_policy(tokenizer, arch)
    reward = reward if reward is not None else LinearReward(model.config.vocab_size)
    return Engine(model, tokenizer, reward, NablaConfig(**{"max_new_tokens": 12, **cfg}))


def _search_engine(tokenizer):
    """A tiny llama with a tiny classifier reward, searching at every position, and 6 seeded requests."""
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=12, n=4, **SEARCH))
    return engine, [engine.request(p, seed=s) for p in PROMPTS for s in range(2)]


def _decisions(result):
    return [(r.proposed_token, r.accepted, r.optimized) for r in result.trace]


def _check_accounting(result, config):
    s, trace = result.stats, result.trace
    assert s.proposals == sum(r.proposed_token is not None for r in trace)
    assert s.rejections == sum(r.accepted is False for r in trace)
    assert s.dto_runs == s.probes == len(trace) - s.nonfinite_gradients * 0
    assert s.skipped_gradient == sum(not r.optimized for r in trace)
    assert s.dto_steps == config.dto_steps * sum(r.optimized for r in trace)
    assert s.cache_hits == sum(r.cache_hits for r in trace)
    assert s.positions == s.skipped_entropy + len(trace)
    assert s.rollouts == 1 + sum(r.proposed_token is not None and r.proposed_token != 4 for r in trace)  # 4: the end token
    assert s.model_calls >= s.model_calls_paper
    assert s.probes_reused == sum(r.probe_reused for r in trace)
    passes = s.probes - s.probes_reused + s.dto_steps - s.cache_hits  # every pass of DTO runs the policy backward once
    assert s.policy_backward == passes
    assert s.model_calls_paper == s.rollout_tokens + 4 * passes + 2 * s.proposals
    assert s.reward_forward >= 2 * s.proposals
    assert s.response_tokens == len(result.token_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [1, 3])
def test_budget_termination_and_accounting(tokenizer, arch, n):
    engine = _engine(tokenizer, arch=arch, n=n, **SEARCH)
    for seed in range(2):
        results = engine.generate([engine.request(p, seed=seed) for p in PROMPTS])
        for r in results:
            assert r.stats.rollouts <= n
            assert len(r.token_ids) <= 12
            assert r.finish_reason in ("stop", "length")
            _check_accounting(r, engine.config)
    assert any(r.stats.proposals > 0 for r in results) or n == 1


def test_proposal_accepted_only_when_strictly_higher(tokenizer):
    engine = _engine(tokenizer, n=8, **SEARCH)
    seen = 0
    for seed in range(2):
        for r in engine.generate([engine.request(p, seed=seed) for p in PROMPTS]):
            for rec in r.trace:
                if rec.proposed_token is not None:
                    seen += 1
                    assert rec.accepted == (rec.reward_proposal > rec.reward_current)
    assert seen > 0


class ConstantReward(LinearReward):
    """Every response scores the same: ties must never be accepted."""

    def score(self, prompts, responses):
        return Scores(torch.zeros(len(responses)), len(responses), 0)


def test_ties_are_rejected(tokenizer):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, ConstantReward(model.config.vocab_size), NablaConfig(max_new_tokens=16, n=8, **SEARCH))
    r = engine.generate([engine.request("What is 2 + 3?", seed=1)])[0]
    assert r.stats.proposals > 0 and r.stats.rejections == r.stats.proposals and r.stats.rollouts <= 8


def test_plain_rejection_sampling_without_dto(tokenizer):
    engine = _engine(tokenizer, n=8, entropy_threshold=0.0, dto_steps=0)
    results = [r for seed in range(3) for r in engine.generate([engine.request(p, seed=seed) for p in PROMPTS])]
    assert all(r.stats.dto_runs == r.stats.policy_backward == 0 for r in results)
    assert sum(r.stats.proposals for r in results) > 0


def test_prefixes_kept_across_positions_decode_like_recomputed_ones(tokenizer, monkeypatch):
    # the decoder extends one prefix KV cache per model as it commits, and scores its comparisons after the reward's
    # prefix; recomputing every prefix and scoring whole responses must agree
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=12, n=4, **SEARCH))
    requests = [engine.request(p, seed=0) for p in PROMPTS]
    given: list[list[object]] = []
    score_groups = engine.reward.score_groups
    monkeypatch.setattr(engine.reward, "score_groups", lambda groups, prefixes=None: given.append(list(prefixes or [])) or score_groups(groups, prefixes))
    kept = engine.generate(requests)
    assert given and all(p is not None for call in given for p in call)  # every comparison scored after a prefix
    given.clear()
    recomputed = engine.generate(requests, engine.config.replace(prefix_cache=False))
    assert given and all(p is None for call in given for p in call)
    for a, b in zip(kept, recomputed):
        assert a.token_ids == b.token_ids
        assert [(r.proposed_token, r.accepted) for r in a.trace] == [(r.proposed_token, r.accepted) for r in b.trace]
        compared = [r for r in b.trace if r.reward_proposal is not None]
        assert [v for r in a.trace if r.reward_proposal is not None for v in (r.reward_current, r.reward_proposal)] == pytest.approx(
            [v for r in compared for v in (r.reward_current, r.reward_proposal)], rel=1e-5, abs=1e-6
        )
        assert [r.loss_start for r in a.trace] == pytest.approx([r.loss_start for r in b.trace], rel=1e-5)
        assert [r.grad_norm for r in a.trace] == pytest.approx([r.grad_norm for r in b.trace], rel=1e-3, abs=1e-6)
    assert sum(r.stats.dto_runs for r in kept) > len(PROMPTS)  # several runs per request shared a prefix


def test_reused_probes_decode_like_fresh_ones(tokenizer):
    # a probe's pass serves the later positions of an unchanged rollout; new passes must agree
    engine, requests = _search_engine(tokenizer)
    reused = engine.generate(requests)
    fresh = engine.generate(requests, engine.config.replace(probe_reuse=False))
    for a, b in zip(reused, fresh):
        assert a.token_ids == b.token_ids
        assert _decisions(a) == _decisions(b)
        assert [r.loss_start for r in a.trace] == pytest.approx([r.loss_start for r in b.trace], rel=1e-5)
        assert [r.grad_norm for r in a.trace] == pytest.approx([r.grad_norm for r in b.trace], rel=1e-3, abs=1e-6)
        assert b.stats.probes_reused == 0 and a.stats.probes == b.stats.probes
        assert a.stats.policy_backward == b.stats.policy_backward - a.stats.probes_reused
    assert sum(r.stats.probes_reused for r in reused) > 0
    assert sum(r.stats.model_calls for r in reused) < sum(r.stats.model_calls for r in fresh)


def test_requests_decoded_together_match_one_at_a_time(tokenizer, monkeypatch):
    # the rollouts that several requests wait on decode in one batch; each request's decisions and counts stay its own
    from nabla_lc.engine.rollout import RolloutBatch

    engine, requests = _search_engine(tokenizer)
    batches: list[int] = []
    original = RolloutBatch.add

    def counted(self, rows):  # the rows that join the scheduler's batch at once
        batches.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(RolloutBatch, "add", counted)
    together = engine.generate(requests)
    assert batches[0] == len(requests) and len(batches) < sum(batches)
    assert sum(batches) == sum(r.stats.rollouts for r in together)
    batches.clear()
    for request, a in zip(requests, together):
        b = engine.generate([request])[0]
        assert a.token_ids == b.token_ids
        assert _decisions(a) == _decisions(b)
        assert dataclasses.replace(a.stats, wall_s=0.0) == dataclasses.replace(b.stats, wall_s=0.0)
        _check_accounting(a, engine.config)
    assert set(batches) == {1}
    assert sum(r.stats.proposals for r in together) > 0


def test_same_seed_same_output_any_batch(tokenizer):
    engine = _engine(tokenizer, n=4, **SEARCH)
    a = engine.generate([engine.request(p, seed=5) for p in PROMPTS])
    b = engine.generate([engine.request(PROMPTS[1], seed=5)])
    assert a[1].text == b[0].text
    assert [r.text for r in a] == [r.text for r in engine.generate([engine.request(p, seed=5) for p in PROMPTS])]
    other = engine.generate([engine.request(p, seed=6) for p in PROMPTS])
    assert [r.text for r in other] != [r.text for r in a]


def test_greedy_is_deterministic_and_matches_transformers(tokenizer):
    engine = _engine(tokenizer, method="greedy")
    requests = [engine.request(p) for p in PROMPTS]
    batched = engine.generate(requests)
    for req, res in zip(requests, batched):
        single = engine.generate([req])[0]
        assert single.token_ids == res.token_ids
        ids = torch.tensor([req.prompt_ids])
        ref = engine.policy.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, pad_token_id=0)
        ref_tokens = [t for t in ref[0, ids.shape[1]:].tolist() if t not in engine.policy.eos_ids]
        assert res.token_ids == ref_tokens[: len(res.token_ids)]
        assert res.stats.rollouts == 1 and res.stats.reward_forward == 0


def test_best_of_n_returns_the_highest_reward_sample(tokenizer):
    engine = _engine(tokenizer, method="bon", n=6)
    for r in engine.generate([engine.request(p, seed=2) for p in PROMPTS]):
        rewards = [s["reward"] for s in r.samples]
        assert r.reward == max(rewards)
        assert r.text == r.samples[rewards.index(max(rewards))]["text"]
        assert r.stats.rollouts == 6 and r.stats.reward_forward == 6


def test_self_consistency_returns_the_majority_answer(tokenizer):
    engine = _engine(tokenizer, method="sc", n=7)
    extract = lambda text: text[:1] or None  # a pluggable extractor: the first character votes
    for r in engine.generate([engine.request(p, seed=3) for p in PROMPTS], extract_answer=extract):
        votes = Counter(s["answer"] for s in r.samples if s["answer"] is not None)
        assert votes[r.answer] == max(votes.values())
        assert r.stats.reward_forward == 0


def test_weighted_bon_sums_rewards_per_answer(tokenizer):
    engine = _engine(tokenizer, method="weighted_bon", n=7)
    extract = lambda text: text[:1] or None
    for r in engine.generate([engine.request(p, seed=3) for p in PROMPTS], extract_answer=extract):
        totals = Counter()
        for s in r.samples:
            totals[s["answer"]] += s["reward"]
        assert totals[r.answer] == pytest.approx(max(totals.values()))


def test_stop_strings_cut_and_never_stream(tokenizer):
    engine = _engine(tokenizer, method="greedy")
    full = engine.generate([engine.request("What is 2 + 3?")])[0].text
    stop = full[5:7]
    assert len(full) > 7
    chunks = []
    r = engine.generate([engine.request("What is 2 + 3?", stop=[stop])], on_token=lambda i, t: chunks.append(t))[0]
    assert r.text == full[: full.find(stop)] and r.finish_reason == "stop"
    assert "".join(chunks) == r.text


@pytest.mark.parametrize("method", ["nabla", "bon", "greedy"])
def test_streamed_deltas_join_to_the_text(tokenizer, method):
    engine = _engine(tokenizer, method=method, n=3, **SEARCH)
    chunks: dict[int, list[str]] = {0: [], 1: []}
    results = engine.generate([engine.request(p, seed=0) for p in PROMPTS[:2]], on_token=lambda i, t: chunks[i].append(t))
    for i, r in enumerate(results):
        assert "".join(chunks[i]) == r.text
    if method in ("nabla", "greedy"):
        assert len(chunks[0]) > 1  # committed tokens stream as they are decided


@pytest.mark.parametrize("method", ["nabla", "greedy"])
def test_engine_streams_typed_events_that_end_in_the_result(tokenizer, method):
    from nabla_lc.engine.types import Finished, TextDelta

    engine = _engine(tokenizer, method=method, n=3, **SEARCH)
    request = engine.request(PROMPTS[0], seed=0)
    events = list(engine.stream(request))
    *deltas, last = events
    assert isinstance(last, Finished) and all(isinstance(e, TextDelta) for e in deltas) and len(deltas) > 1
    assert "".join(e.text for e in deltas) == last.result.text == engine.generate([request])[0].text


class NanReward(LinearReward):
    def score_soft(self, prefix, y):
        out = super().score_soft(prefix, y)
        out.value = out.value * float("nan")
        return out


def test_nan_gradients_fall_back_to_the_rollout_token(tokenizer, caplog):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, NanReward(model.config.vocab_size), NablaConfig(max_new_tokens=8, **SEARCH))
    r = engine.generate([engine.request("What is 2 + 3?", seed=0)])[0]
    assert r.stats.nonfinite_gradients > 0 and r.stats.proposals == 0
    assert "non-finite" in caplog.text


class Verifier(RewardAdapter):
    def score(self, prompts, responses):
        return Scores(torch.tensor([float(len(r)) for r in responses]), len(responses), 0)

    @property
    def differentiable(self) -> bool:
        return False


def test_reward_without_gradients_falls_back_or_refuses(tokenizer, caplog):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, Verifier(), NablaConfig(max_new_tokens=8, **SEARCH))
    r = engine.generate([engine.request("What is 2 + 3?", seed=0)])[0]
    assert r.stats.reward_backward == 0 and r.stats.policy_backward > 0
    assert "likelihood term alone" in caplog.text
    with pytest.raises(NoGradientError, match="no_gradient_reward"):
        engine.generate([engine.request("What is 2 + 3?")], engine.config.replace(no_gradient_reward="error"))


def test_bad_input_is_a_clear_error(tokenizer):
    engine = _engine(tokenizer)
    with pytest.raises(ValueError, match="empty"):
        engine.request("   ")
    with pytest.raises(ValueError, match="context"):
        engine.generate([engine.request("x" * 600)])
    no_reward = Engine(make_policy(tokenizer), tokenizer)
    with pytest.raises(ConfigError, match="needs a reward"):
        no_reward.generate([no_reward.request("hi")], NablaConfig(method="bon"))
    assert no_reward.generate([no_reward.request("hi")], NablaConfig(method="sc", n=2, max_new_tokens=4))


def test_a_running_batch_drops_the_columns_of_rows_that_left(tokenizer):
    # a long prefix joins, leaves, and its padding columns must not stay in the cache of the rows still running
    from nabla_lc.engine.accounting import Stats
    from nabla_lc.engine.policy import Policy
    from nabla_lc.engine.rollout import RolloutBatch, RolloutRow, Sampling

    policy = Policy(make_policy(tokenizer), tokenizer)
    batch = RolloutBatch(policy, Sampling(1.0))
    row = lambda prefix, budget: RolloutRow(prefix, [], budget, (), torch.Generator().manual_seed(0), Stats())
    batch.add([row([5, 6], 12)])
    batch.step()
    batch.add([row(list(range(5, 45)), 1)])  # 40 prefix tokens, one token of budget
    assert batch.mask is not None and batch.mask.shape[1] == 40
    finished = batch.step()
    assert [b for b, _ in finished] == [1]
    assert batch.mask is not None and batch.mask.shape[1] == 2 + 2  # the short row's prefix and its two steps
    assert batch.cache is not None and all(shape[2] == batch.mask.shape[1] for shape in kv.shapes(batch.cache))


@pytest.mark.parametrize("fail", ["encoding", "merging"])
def test_a_failed_join_leaves_the_batch_as_it_was(tokenizer, monkeypatch, fail):
    # a row runs; a join fails (its prefix pass, or the cache merge after one layer); the row goes on as if alone
    from nabla_lc.engine.accounting import Stats
    from nabla_lc.engine.policy import Policy
    from nabla_lc.engine.rollout import RolloutBatch, RolloutRow, Sampling, rollout

    policy = Policy(make_policy(tokenizer), tokenizer)
    row = lambda prefix, budget: RolloutRow(prefix, [], budget, (), torch.Generator().manual_seed(0), Stats())
    [alone] = rollout(policy, [row([5, 6, 7], 8)], Sampling(1.0))
    batch = RolloutBatch(policy, Sampling(1.0))
    batch.add([row([5, 6, 7], 8)])
    finished = batch.step() + batch.step()
    before = (batch.count, list(batch.active), set(batch.rows), set(batch.tokens), set(batch.kept), set(batch.kept_allowed))
    shapes = kv.shapes(batch.cache), batch.mask.shape, batch.logits.shape, batch.last_position.shape

    if fail == "encoding":
        def broken(*args, **kwargs):
            raise RuntimeError("injected")

        monkeypatch.setattr(policy, "model", broken)
    else:
        calls = [0]
        original = kv.cat_left_padded

        def broken(old, new):  # each layer's keys, then its values: fail in the second layer
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected")
            return original(old, new)

        monkeypatch.setattr(kv, "cat_left_padded", broken)
    stats = Stats()
    with pytest.raises(RuntimeError, match="injected"):
        batch.add([RolloutRow(list(range(5, 25)), [], 4, (), None, stats), row([8], 0)])
    monkeypatch.undo()
    assert (batch.count, list(batch.active), set(batch.rows), set(batch.tokens), set(batch.kept), set(batch.kept_allowed)) == before
    assert (kv.shapes(batch.cache), batch.mask.shape, batch.logits.shape, batch.last_position.shape) == shapes
    assert stats.policy_forward == 0  # the failed row's pass is not counted
    while batch.active:
        finished += batch.step()
    assert [(b, r.tokens) for b, r in finished] == [(0, alone.tokens)]


def test_coupled_rollouts_draw_the_same_randomness_at_the_same_position(tokenizer):
    # a row with noise, rolled out from one token further, draws the rest exactly as the first row did; without the
    # noise key the shifted row's generator is one draw behind, so its continuation is its own
    from nabla_lc.engine.accounting import Stats
    from nabla_lc.engine.policy import Policy
    from nabla_lc.engine.rollout import RolloutRow, Sampling, rollout

    policy = Policy(make_policy(tokenizer), tokenizer)
    prompt = tokenizer.encode("What is 2 + 3?")

    def row(head: list[int], noise: int | None) -> RolloutRow:
        return RolloutRow(prompt + head, head, 12 - len(head), (), torch.Generator().manual_seed(3), Stats(), noise=noise)

    shifted = {}
    for noise in (7, None):
        [first] = rollout(policy, [row([], noise)], Sampling(1.5))
        [second] = rollout(policy, [row(first.tokens[:1], noise)], Sampling(1.5))
        assert len(first.tokens) >= 4
        shifted[noise] = second.tokens == first.tokens[1:]
    assert shifted == {7: True, None: False}


def test_coupled_rollouts_decode_alike_alone_and_together_and_count_the_same(tokenizer):
    engine, requests = _search_engine(tokenizer)
    config = engine.config.replace(coupled_rollouts=True)
    together = engine.generate(requests, config)
    assert sum(r.stats.proposals for r in together) > 0
    for request, a in zip(requests, together):
        b = engine.generate([request], config)[0]
        assert a.token_ids == b.token_ids and _decisions(a) == _decisions(b)
        _check_accounting(a, config)
    assert [r.token_ids for r in together] != [r.token_ids for r in engine.generate(requests)]  # the option changes decoding


@pytest.mark.parametrize("seed", range(4))
def test_top_p_from_the_top_candidates_keeps_what_a_whole_sort_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 2000, generator=g) * torch.tensor([[0.1], [1.0], [4.0], [8.0], [20.0]])  # flat to peaked rows
    logits[:, 7] = logits[:, 3]  # ties
    logits[2, :1000] = float("-inf")  # half masked, as under a grammar
    logits[4, 11] = logits[4].max()  # a tie at the top
    for top_p in (0.05, 0.5, 0.9, 0.95, 1.0 - 1e-6):
        kept = torch.isfinite(filter_logits(logits, top_p, 0))
        assert torch.equal(kept, ~rollout_module._outside_nucleus(logits, top_p) & torch.isfinite(logits))
    assert rollout_module._outside_nucleus_of_candidates(logits[3:], 0.9) is not None  # peaked rows: no whole sort
    assert rollout_module._outside_nucleus_of_candidates(logits[:1], 0.9) is None  # a flat row's nucleus is past the candidates
    tie = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    p = tie.softmax(-1)[0]
    edge = float(p[0] + p[1] / 2)  # the nucleus ends between the two equal logits
    assert rollout_module._outside_nucleus_of_candidates(tie, edge) is None
    assert torch.equal(torch.isfinite(filter_logits(tie, edge, 0)), ~rollout_module._outside_nucleus(tie, edge))


DECISIONS = ("rollouts", "proposals", "rejections", "positions", "probes", "dto_runs", "skipped_entropy", "skipped_gradient", "response_tokens")


@pytest.mark.parametrize("coupled", [False, True])
def test_a_proposal_window_makes_the_same_decisions_with_fewer_rollout_rounds(tokenizer, monkeypatch, coupled):
    # W > 1 walks on past a proposal as if it were rejected and rolls the proposals out together; with keyed draws
    # every W > 1 decodes the same tokens and decisions, and discarded work is counted as work only
    from nabla_lc.engine.rollout import RolloutBatch

    engine, requests = _search_engine(tokenizer)
    joins: list[int] = []
    original = RolloutBatch.add

    def counted(self, rows):
        joins.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(RolloutBatch, "add", counted)
    runs, rounds = {}, {}
    for window in (2, 3, 8):
        config = engine.config.replace(proposal_window=window, coupled_rollouts=coupled, n=6)
        joins.clear()
        runs[window] = [engine.generate([r], config)[0] for r in requests]
        rounds[window] = len(joins)
    for a, b, c in zip(runs[2], runs[3], runs[8]):
        assert a.token_ids == b.token_ids == c.token_ids
        assert _decisions(a) == _decisions(b) == _decisions(c)
        assert a.reward == pytest.approx(b.reward, abs=1e-5) and a.reward == pytest.approx(c.reward, abs=1e-5)  # scored in other batches
        for name in DECISIONS:
            assert getattr(a.stats, name) == getattr(b.stats, name) == getattr(c.stats, name), name
        assert a.stats.rollouts <= 6
        assert c.stats.policy_forward >= a.stats.policy_forward  # work done ahead and discarded still counts
    assert sum(r.stats.proposals for r in runs[2]) > 0 and sum(r.stats.rejections for r in runs[2]) > 0
    assert rounds[8] < rounds[2]  # fewer sequential rollout rounds
    together = engine.generate(requests, engine.config.replace(proposal_window=3, coupled_rollouts=coupled, n=6))
    for a, b in zip(together, runs[3]):
        assert a.token_ids == b.token_ids and _decisions(a) == _decisions(b)
        assert dataclasses.replace(a.stats, wall_s=0.0) == dataclasses.replace(b.stats, wall_s=0.0)


def test_a_window_of_one_keeps_the_accounting_of_the_paper_search(tokenizer):
    # every walked position is applied with W = 1 (the proposal ends the walk), so no work is discarded; the decoder
    # before the window made the same decisions (docs/check_same_behaviour.py, byte for byte but the new config key)
    engine, requests = _search_engine(tokenizer)
    results = engine.generate(requests, engine.config.replace(proposal_window=1))
    for a in results:
        _check_accounting(a, engine.config)
    assert sum(r.stats.proposals for r in results) > 0


@pytest.mark.parametrize("how", ["no budget", "cancelled mid-prefill"])
def test_a_grammar_row_that_samples_nothing_has_empty_logits_and_masks(tokenizer, how):
    from nabla_lc.engine.accounting import Stats
    from nabla_lc.engine.constraints import Grammar
    from nabla_lc.engine.policy import Policy
    from nabla_lc.engine.rollout import RolloutBatch, RolloutRow, Sampling
    from nabla_lc.engine.types import Constraint

    policy = Policy(make_policy(tokenizer), tokenizer)
    grammar = Grammar.start(policy, Constraint.regex("(yes|no)"), 4)
    batch = RolloutBatch(policy, Sampling(1.0), keep_logits=True, keep_going=lambda b: False, prefill_chunk=4)
    row = RolloutRow(list(range(5, 15)), [], 0 if how == "no budget" else 4, (), torch.Generator().manual_seed(0), Stats(), grammar)
    [(_, out)] = batch.add([row]) or batch.step()
    assert out.tokens == [] and out.finish_reason == ("length" if how == "no budget" else "cancelled")
    assert out.logits is not None and out.logits.shape == (0, policy.vocab_size)
    assert out.allowed is not None and out.allowed.shape == (0, policy.vocab_size) and out.allowed.dtype == torch.bool
