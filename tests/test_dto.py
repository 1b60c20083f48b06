"""DTO: straight-through gradients, caching, prefix KV reuse, fp32 logits."""

import pytest
import torch

from nabla_lc import NablaConfig, Stats
from nabla_lc.engine.dto import DTORun, PrefixEncoder, encode_prefix, extend_prefix, straight_through_grad, token_logprobs
from nabla_lc.engine.policy import Policy
from nabla_lc.engine.rollout import RolloutRow, Sampling, rollout

from .tiny import LinearReward, make_classifier_reward, make_policy


def _setup(tokenizer, arch="llama", dtype=torch.float32, reward="classifier", **cfg):
    model = make_policy(tokenizer, arch, dtype=dtype)
    policy = Policy(model, tokenizer)
    reward = make_classifier_reward(tokenizer, arch, dtype=dtype) if reward == "classifier" else LinearReward(policy.vocab_size)
    config = NablaConfig(**{"max_new_tokens": 12, "reward_weight": 2.0, **cfg})
    prompt = policy.template("What is 3 + 4?")
    committed = [tokenizer.convert_tokens_to_ids("7")]
    stats = Stats()
    row = RolloutRow(prompt + committed, [], 10, (), torch.Generator().manual_seed(0), stats)
    r = rollout(policy, [row], Sampling(1.0), keep_logits=True)[0]
    return policy, reward, config, prompt, committed, r


def _run(policy, reward, config, prompt, committed, r, stats=None):
    return DTORun(policy, reward, config, "q", prompt + committed, committed, r.tokens, r.logits, stats or Stats())


def _loss(run, y, hard=None):
    prefix, reward_prefix = run.prefixes()
    lp = token_logprobs(run.policy, prefix, y, hard).sum()
    return -lp - run.config.reward_weight * run.reward.score_soft(reward_prefix, y).value


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture
def float64_norms(monkeypatch):
    """RMSNorm upcasts to fp32 even in a float64 model; keep float64 so finite differences are exact."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", _rms_norm_in_input_dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradient_matches_central_finite_differences(tokenizer, arch, float64_norms):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, arch, dtype=torch.float64)
    run = _run(policy, reward, config, prompt, committed, r)
    hard = run.hard()
    assert run.reward is not None  # the gradient includes the classifier reward's
    # a relaxed point: one-hots blended with a random distribution
    torch.manual_seed(0)
    y0 = 0.7 * torch.nn.functional.one_hot(hard, policy.vocab_size).double() + 0.3 * torch.rand(len(hard), policy.vocab_size, dtype=torch.float64).softmax(-1)
    y = y0.clone().requires_grad_(True)
    _loss(run, y).backward()
    eps = 1e-5
    for t, v in [(0, int(hard[0])), (0, 5), (len(hard) // 2, 17), (len(hard) - 1, int(hard[-1]))]:
        plus, minus = y0.clone(), y0.clone()
        plus[t, v] += eps
        minus[t, v] -= eps
        with torch.no_grad():
            fd = (_loss(run, plus) - _loss(run, minus)) / (2 * eps)
        assert float(y.grad[t, v]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_fast_one_hot_path_equals_dense_product(tokenizer):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, dtype=torch.float64)
    run = _run(policy, reward, config, prompt, committed, r)
    hard = run.hard()
    dense = torch.nn.functional.one_hot(hard, policy.vocab_size).double().requires_grad_(True)
    _loss(run, dense).backward()
    _, g, _ = run.loss_and_grad(hard)
    torch.testing.assert_close(g.double(), dense.grad, rtol=1e-5, atol=1e-6)  # g is fp32


def _assert_same_passes(a, b):
    for _ in range(2):  # the second pass checks the prefix caches were restored after the first
        l1, g1, _ = a.loss_and_grad(a.hard())
        l2, g2, _ = b.loss_and_grad(b.hard())
        assert l1 == pytest.approx(l2, abs=1e-5)
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_kv_reuse_gives_the_same_gradients(tokenizer, arch):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, arch)
    cached = _run(policy, reward, config, prompt, committed, r)
    full = _run(policy, reward, config.replace(prefix_cache=False), prompt, committed, r)
    _assert_same_passes(cached, full)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefixes_extended_across_positions_give_the_same_gradients(tokenizer, arch):
    # the decoder encodes prompt + committed once and extends it by the tokens committed since the last run
    policy, reward, config, prompt, committed, r = _setup(tokenizer, arch)
    stats = Stats()
    prefix = encode_prefix(policy, prompt, stats)
    reward_prefix = reward.prepare("q", [])
    extended = extend_prefix(policy, prefix, prompt + committed, stats)
    reward_prefix = reward.extend(reward_prefix, "q", committed)
    assert stats.policy_tokens == len(prompt) + len(committed) and reward_prefix.tokens == len(committed)
    torch.testing.assert_close(extended.next_logp, encode_prefix(policy, prompt + committed, Stats()).next_logp, rtol=0, atol=1e-5)
    reused = DTORun(policy, reward, config, "q", prompt + committed, committed, r.tokens, r.logits, Stats(), prefixes=lambda: (extended, reward_prefix))
    fresh = _run(policy, reward, config, prompt, committed, r)
    _assert_same_passes(reused, fresh)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_probe_pass_serves_later_positions_of_the_same_rollout(tokenizer, arch):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, arch)
    first = _run(policy, reward, config, prompt, committed, r)
    first.probe()
    earlier = first.probe_pass
    assert earlier is not None and not first.probe_reused

    def later(k, stats, tokens=r.tokens):  # the position k tokens further on, the rollout's first k tokens committed
        done = committed + list(tokens[:k])
        return DTORun(policy, reward, config, "q", prompt + done, done, tokens[k:], r.logits[k:], stats)

    for k in (1, 4):
        stats = Stats()
        reused = later(k, stats)
        norm = reused.probe(earlier)
        assert reused.probe_reused and stats.probes_reused == 1
        assert stats.model_calls == 0  # no pass, and no prefix encoded
        fresh = later(k, Stats())
        assert norm == pytest.approx(fresh.probe(), rel=1e-4)
        assert reused.loss_start == pytest.approx(fresh.loss_start, abs=1e-4)
        torch.testing.assert_close(reused._cached[1], fresh._cached[1], rtol=0, atol=1e-5)
        assert reused.probe_pass is earlier  # kept as taken: later positions shift from the same pass
        torch.testing.assert_close(earlier.at(len(committed) + k).logp, fresh.probe_pass.found.logp, rtol=0, atol=1e-5)
    changed = list(r.tokens)
    changed[2] = (changed[2] + 1) % policy.vocab_size
    other = later(1, Stats(), changed)
    other.probe(earlier)
    assert not other.probe_reused and other.stats.policy_backward == 1  # another response: a new pass


def test_cached_gradients_equal_recomputed(tokenizer):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, dto_steps=10)
    s_cached, s_fresh = Stats(), Stats()
    cached = _run(policy, reward, config, prompt, committed, r, s_cached)
    fresh = _run(policy, reward, config.replace(gradient_cache=False), prompt, committed, r, s_fresh)
    for run in (cached, fresh):
        run.probe()
        run.optimize()
    torch.testing.assert_close(cached.z.detach(), fresh.z.detach(), rtol=0, atol=1e-6)
    assert s_cached.cache_hits > s_fresh.cache_hits == 1  # only the probe's pass is reused without caching
    assert s_cached.policy_backward < s_fresh.policy_backward
    # and the cached dL/dy is exactly what a new pass at the same hard tokens computes
    hard, g, _ = cached._cached
    _, g_new, _ = cached.loss_and_grad(hard)
    torch.testing.assert_close(g, g_new, rtol=0, atol=0)


def test_dto_lowers_the_loss_on_a_fixed_input(tokenizer):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, dto_steps=20)  # paper defaults
    run = _run(policy, reward, config, prompt, committed, r)
    relaxed = lambda: float(_loss(run, (run.z.detach() / config.tau).softmax(-1)))
    relaxed0 = relaxed()
    run.probe()
    hard0, g0, loss0 = run._cached
    s0 = (run.z.detach() / config.tau).softmax(-1)
    run.optimize()
    s1 = (run.z.detach() / config.tau).softmax(-1)
    assert float((g0 * s1).sum()) < float((g0 * s0).sum())  # the first-order model of L decreases
    assert relaxed() < relaxed0  # so does L at the relaxed tokens softmax(z/τ)
    assert not torch.equal(run.hard(), hard0)  # the hard tokens moved...
    assert run.loss_end < loss0  # ...to a rollout with a lower L


def test_bf16_policy_keeps_fp32_logits_that_move_by_small_steps(tokenizer):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, dtype=torch.bfloat16, reward="linear", dto_steps=1, lr=0.01, min_lr=0.01, weight_decay=0.0)
    run = _run(policy, reward, config, prompt, committed, r)
    z0 = run.z.detach().clone()
    run.probe()
    run.optimize()
    assert run.z.dtype == torch.float32
    moved = (run.z.detach() - z0).abs()
    assert moved.max() > 0.009  # Adam's first step moves by ~lr
    # the same step on bf16 logits of this size would round away
    big = z0.abs() > 4
    assert ((z0[big].bfloat16() + 0.01).float() == z0[big].bfloat16().float()).any()


def test_straight_through_grad_is_the_softmax_jacobian(tokenizer):
    torch.manual_seed(0)
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, dtype=torch.float64)
    (g * (z / 0.5).softmax(-1)).sum().backward()
    torch.testing.assert_close(straight_through_grad(z.detach(), g, 0.5), z.grad)


def test_first_only_updates_one_position(tokenizer):
    policy, reward, config, prompt, committed, r = _setup(tokenizer, dto_positions="first")
    run = _run(policy, reward, config, prompt, committed, r)
    assert run.z.shape[0] == 1
    run.probe()
    run.optimize()
    assert torch.equal(run.hard()[1:], torch.tensor(r.tokens[1:]))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_costs_times_steps_that_run_the_model(tokenizer, prefix_cache):
    from nabla_lc.bench.costs import measure

    policy = Policy(make_policy(tokenizer), tokenizer)
    row = measure(policy, prompt_len=6, rollout_len=5, prefix_cache=prefix_cache, repeats=2)
    assert row["dto_step_s"] > 0 and row["forward_s"] > 0
    assert row["dto_step_over_forward"] == row["dto_step_s"] / row["forward_s"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_rollouts_cache_gives_the_prefix_a_fresh_encoding_gives(tokenizer, arch):
    # ∇ takes DTO's policy prefix (prompt + committed) from the cache its rollout left, with no pass of its own
    policy, reward, config, prompt, committed, _ = _setup(tokenizer, arch)
    rows = [
        RolloutRow(prompt + committed, committed, 10, (), torch.Generator().manual_seed(0), Stats(), keep_cache=True),
        RolloutRow(policy.template("hi"), [], 4, (), torch.Generator().manual_seed(1), Stats()),  # a shorter row: left padding
    ]
    r, other = rollout(policy, rows, Sampling(1.0), keep_logits=True)
    assert r.cache is not None and other.cache is None and len(r.tokens) > 3
    for k in (0, 3):  # the rollout's prefix, and with 3 of its tokens committed since
        done = committed + r.tokens[:k]
        ids = prompt + done
        forwards = []
        handle = policy.model.register_forward_hook(lambda *_: forwards.append(1))  # noqa: B023 (why: called within this iteration)
        try:
            cached, _ = PrefixEncoder(policy, reward, config, Stats()).encode("q", ids, done, (r.cache.head(len(ids)), r.logits[k]))
        finally:
            handle.remove()
        assert forwards == []  # no policy pass
        fresh = encode_prefix(policy, ids, Stats())
        torch.testing.assert_close(cached.next_logp, fresh.next_logp, rtol=0, atol=1e-5)
        for a, b in zip(cached.snapshot.tensors, fresh.snapshot.tensors):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        rest = r.drop(k)
        reused = DTORun(policy, reward, config, "q", ids, done, rest.tokens, rest.logits, Stats(), prefixes=lambda: (cached, reward.prepare("q", done)))  # noqa: B023
        _assert_same_passes(reused, DTORun(policy, reward, config, "q", ids, done, rest.tokens, rest.logits, Stats()))


def test_nabla_encodes_no_policy_prefix_beside_its_rollouts(tokenizer, monkeypatch):
    from nabla_lc import Engine
    from nabla_lc.engine.rollout import RolloutBatch

    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=10))
    config = engine.config.replace(method="nabla", n=3, dto_steps=2, grad_threshold=0.0, entropy_threshold=0.0)
    encodings, joined = [], []
    join = RolloutBatch._join

    def counted_join(self, new, *encoded) -> None:
        joined.append(len(new))
        join(self, new, *encoded)

    monkeypatch.setattr(RolloutBatch, "_join", counted_join)

    def count(module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a prefix encoded (a decoding step has one token a row)
            encodings.append(ids.shape[0])

    handle = model.register_forward_hook(count, with_kwargs=True)
    try:
        result = engine.generate([engine.request("What is 3 + 4?", seed=0)], config)[0]
    finally:
        handle.remove()
    assert result.stats.policy_backward > 0  # the precondition: DTO ran passes
    assert len(encodings) == len(joined) and sum(joined) > 1  # the rollouts' joins only: DTO's prefixes came from their caches
