"""The DTO step rules (the paper's AdamW, the trust region, the mirror step), the proposal gate, both rejection rates, diagnose."""

import math
import statistics

import pytest
import torch

from nabla_lc import Engine, NablaConfig, Stats
from nabla_lc.diagnose import diagnose, pearson, proposal_gain, spread
from nabla_lc.engine.dto import DTORun, kl_rows, straight_through_grad, trust_region
from nabla_lc.engine.policy import Policy
from nabla_lc.engine.rollout import RolloutRow, Sampling, differ_chance, rollout

from .tiny import LinearReward, make_classifier_reward, make_policy

PROMPTS = ["What is 2 + 3?", "What is 4 * 5?", "Add 7 and 8.", "Name a color.", "Count to three."]


class DigitReward(LinearReward):
    """r(y) = the fraction of digit tokens: a reward whose gradient says exactly which swaps raise it."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.w = torch.zeros(vocab_size)
        self.w[[tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]] = 1.0


def test_trust_region_reaches_the_target_kl_along_the_direction():
    g = torch.Generator().manual_seed(0)
    z0 = 3 * torch.randn(4, 50, generator=g)
    z1 = z0 + 0.1 * torch.randn(4, 50, generator=g)
    for target in (0.01, 0.5, 2.0):
        z = trust_region(z0, z1, 0.5, target)
        torch.testing.assert_close(kl_rows(z, z0, 0.5), torch.full((4,), target), rtol=1e-3, atol=1e-6)
        alpha = (z - z0) / (z1 - z0)  # one positive factor per row: the direction is kept
        assert bool((alpha > 0).all())
        torch.testing.assert_close(alpha, alpha[:, :1].expand_as(alpha), rtol=1e-3, atol=1e-4)


def test_trust_region_rows_that_cannot_reach_the_target():
    z0 = torch.zeros(2, 2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # row 0 saturates at KL log 2; row 1 does not move
    z = trust_region(z0, z1, 1.0, 1.0)
    assert bool(torch.isfinite(z).all())
    assert float(kl_rows(z, z0, 1.0)[0]) == pytest.approx(math.log(2), rel=1e-3)
    assert torch.equal(z[1], z0[1])


def _run(tokenizer, reward, **cfg):
    model = make_policy(tokenizer)
    policy = Policy(model, tokenizer)
    reward = reward(tokenizer, policy.vocab_size) if reward is DigitReward else reward
    config = NablaConfig(**{"max_new_tokens": 12, "dto_steps": 5, **cfg})
    prompt = policy.template("What is 3 + 4?")
    r = rollout(policy, [RolloutRow(prompt, [], 10, (), torch.Generator().manual_seed(0), Stats())], Sampling(1.0), keep_logits=True)[0]
    return DTORun(policy, reward, config, "q", prompt, [], r.tokens, r.logits, Stats()), r


@pytest.mark.parametrize("positions", ["first", "all"])
def test_a_trust_region_run_moves_every_row_by_the_target_kl(tokenizer, positions):
    run, r = _run(tokenizer, DigitReward, step="trust_region", target_kl=0.3, dto_positions=positions)
    run.probe()
    z = run.optimize()
    rows = 1 if positions == "first" else len(r.tokens)
    assert z.shape[0] == rows
    torch.testing.assert_close(kl_rows(z, r.logits[:rows].float(), 0.5), torch.full((rows,), 0.3), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("positions", ["first", "all"])
def test_the_mirror_step_solves_the_linearised_problem_in_the_kl_ball(tokenizer, positions):
    """z̃ = z − α·dL/dy at the KL target, and no distribution in the same ball has a lower linearised loss ⟨g, p⟩."""
    run, r = _run(tokenizer, DigitReward, step="mirror", target_kl=0.3, dto_positions=positions)
    run.probe()
    g = run.probe_pass.found.grad.float()
    z = run.optimize()
    rows = z.shape[0]
    z0, g = r.logits[:rows].float(), g[:rows]
    torch.testing.assert_close(kl_rows(z, z0, 0.5), torch.full((rows,), 0.3), rtol=1e-3, atol=1e-6)
    alpha = (z0 - z) / g  # one positive factor per row along −g
    finite = g.abs() > 1e-3
    assert bool((alpha[finite] > 0).all())
    for row in range(rows):
        a = alpha[row][finite[row]]
        torch.testing.assert_close(a, a[:1].expand_as(a), rtol=1e-3, atol=1e-5)
    best = ((z / 0.5).softmax(-1) * g).sum(-1)  # [rows]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # any other direction, scaled to the same KL, does worse on ⟨g, p⟩
        other = trust_region(z0, z0 + 5 * torch.randn(z0.shape, generator=gen), 0.5, 0.3)
        assert bool((((other / 0.5).softmax(-1) * g).sum(-1) >= best - 1e-4).all())
    adam = DTORun(run.policy, run.reward, run.config.replace(step="trust_region"), "q", run.prefix_ids, [], r.tokens, r.logits, Stats())
    adam.probe()
    assert bool((((adam.optimize() / 0.5).softmax(-1) * g).sum(-1) >= best - 1e-4).all())  # nor does the AdamW direction


def test_the_mirror_step_needs_no_pass_beyond_the_probe(tokenizer):
    run, _ = _run(tokenizer, DigitReward, step="mirror", dto_steps=20)
    run.probe()
    before = run.stats.to_dict()
    run.optimize()
    after = run.stats.to_dict()
    assert after["policy_forward"] == before["policy_forward"] and after["policy_backward"] == before["policy_backward"]
    assert (after["dto_steps"], after["cache_hits"], run.steps) == (1, 1, 1)
    assert run.stats.model_calls_paper == 4  # the probe's pass, the one uncached step


def test_the_paper_step_moves_each_logit_by_at_most_the_summed_lr(tokenizer):
    run, r = _run(tokenizer, DigitReward, weight_decay=0.0, lr=0.01, min_lr=0.001, dto_steps=20)
    run.probe()
    z = run.optimize()
    move = float((z - r.logits[: z.shape[0]].float()).abs().max())
    assert 0.05 < move <= 20 * 0.01 + 1e-6  # AdamW: about ±lr per step whatever the logits' scale


def test_the_probe_uses_the_straight_through_temperature(tokenizer):
    norms = {}
    for st_tau in (0.5, 1.0):
        run, _ = _run(tokenizer, make_classifier_reward(tokenizer), reward_weight=2.0, st_tau=st_tau)
        norms[st_tau] = run.probe()
        g = run.probe_pass.found.grad
        expected = float(straight_through_grad(run.z.detach()[:1], g[:1], st_tau).norm()) / 2.0
        assert norms[st_tau] == pytest.approx(expected, rel=1e-5)
    assert norms[0.5] != pytest.approx(norms[1.0], rel=1e-3)


def _final_reward(reward, result):
    return float(reward.score([""], [result.token_ids]).values[0])


def test_trust_region_and_mirror_make_proposals_win_where_the_gradient_is_informative(tokenizer):
    """Plain rejection sampling rejects most proposals; trust-region or mirror DTO with an informative reward does not."""
    model = make_policy(tokenizer)
    reward = DigitReward(tokenizer, model.config.vocab_size)
    engine = Engine(model, tokenizer, reward)
    base = NablaConfig(max_new_tokens=4, n=8, entropy_threshold=0.0, grad_threshold=0.0, dto_positions="first", dto_steps=20)
    rates, rewards = {}, {}
    steps = {"rs": base.replace(dto_steps=0), "tr": base.replace(step="trust_region", target_kl=2.0), "mirror": base.replace(step="mirror", target_kl=2.0)}
    for name, config in steps.items():
        results = [r for seed in range(6) for r in engine.generate([engine.request(p, seed=seed) for p in PROMPTS], config)]
        stats = [r.stats for r in results]
        rates[name] = sum(s.rejections for s in stats) / sum(s.proposals for s in stats)
        rewards[name] = statistics.mean(_final_reward(reward, r) for r in results)
    for name in ("tr", "mirror"):
        assert rates[name] <= rates["rs"] - 0.30, rates
        assert rewards[name] > rewards["rs"], rewards


def test_the_proposal_gate_skips_positions_before_their_probe(tokenizer):
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, LinearReward(model.config.vocab_size), NablaConfig(max_new_tokens=12, n=4, entropy_threshold=0.0, grad_threshold=0.0))
    requests = [engine.request(p, seed=0) for p in PROMPTS]
    open_gate = engine.generate(requests)
    gated = engine.generate(requests, engine.config.replace(differ_threshold=0.3))
    for r in open_gate:
        assert r.stats.skipped_differ == 0
    for r in gated:
        s = r.stats
        assert s.positions == s.skipped_entropy + s.skipped_differ + s.probes
        assert len(r.trace) == s.probes
    assert sum(r.stats.skipped_differ for r in gated) > 0
    assert sum(r.stats.probes for r in gated) < sum(r.stats.probes for r in open_gate)


def test_differ_chance_is_the_proposal_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -5.0])
    p = (logits / 0.5).softmax(-1)
    assert differ_chance(logits, 0, Sampling(0.5)) == pytest.approx(1 - float(p[0]), rel=1e-6)
    # top-p 0.9 keeps tokens 0 and 1 only, renormalized
    assert differ_chance(logits, 0, Sampling(0.5, top_p=0.9)) == pytest.approx(float(p[1] / (p[0] + p[1])), rel=1e-6)
    assert differ_chance(logits, 3, Sampling(0.5, top_p=0.9)) == 1.0
    assert differ_chance(logits, 0, Sampling(0.0)) == 0.0


def test_both_rejection_rates():
    s = Stats(rollouts=6, proposals=7, rejections=5)
    assert s.rejection_rate == 5 / 7
    assert s.rejection_rate_generations == 5 / 8  # the first rollout counts as a generation
    assert Stats().rejection_rate_generations == 0.0
    d = s.to_dict()
    assert d["rejection_rate_generations"] == 5 / 8 and d["rejection_rate"] == 5 / 7


def test_diagnose_with_a_linear_reward_predicts_every_swap(tokenizer):
    """For r linear in the token vectors the first-order prediction is exact: correlation 1, every sign right."""
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, LinearReward(model.config.vocab_size))
    config = NablaConfig(max_new_tokens=10, entropy_threshold=0.0, step="trust_region", target_kl=0.2, dto_steps=3)
    requests = [engine.request(p, seed=1) for p in PROMPTS[:2]]
    found = diagnose(engine, requests, config, positions=3, k=5)
    assert len(found.positions) == 6
    for p in found.positions:
        assert len(p.swaps) == 5
        for s in p.swaps:
            assert s.predicted == pytest.approx(s.actual, abs=1e-5)
        assert p.swap_pearson == pytest.approx(1.0, abs=1e-4) and p.swap_best_found
        assert p.kl == pytest.approx(0.2, rel=1e-3)
    summary = found.summary
    assert summary["swap_pearson_mean"] == pytest.approx(1.0, abs=1e-4) and summary["swap_sign_agreement"] == 1.0
    assert summary["kl_mean"] == pytest.approx(0.2, rel=1e-3)
    s = found.stats
    assert s.probes == s.dto_runs == 6 and s.rollouts == 2
    assert s.reward_forward >= 6 * 6  # each position scores the response and its 5 swaps
    assert s.model_calls >= s.model_calls_paper > 0


def test_the_proposal_gain_by_hand():
    config = NablaConfig(tau=1.0, top_p=1.0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1]))
    gain, win = proposal_gain(logits, [1, 2, 3], [1.0, -2.0, 0.0], config)
    assert gain == pytest.approx((0.3 * 1.0 + 0.1 * -2.0) / 0.5) and win == pytest.approx(0.3 / 0.5)
    assert proposal_gain(logits, [], [], config) == (None, None)


def test_diagnose_sees_the_mirror_step_move_proposals_toward_better_swaps(tokenizer):
    """With a linear reward (an exact gradient) and λ large, the mirror step's proposals gain more reward among the
    scored swaps than proposals from the rollout's logits, at every probed position."""
    model = make_policy(tokenizer)
    engine = Engine(model, tokenizer, LinearReward(model.config.vocab_size))
    config = NablaConfig(max_new_tokens=10, entropy_threshold=0.0, step="mirror", target_kl=0.5, reward_weight=1e4)
    found = diagnose(engine, [engine.request(p, seed=1) for p in PROMPTS[:2]], config, positions=3, k=5)
    for p in found.positions:
        assert p.swap_gain_dto > p.swap_gain_z and p.swap_win_dto >= p.swap_win_z
    summary = found.summary
    assert summary["swap_gain_dto_mean"] > summary["swap_gain_z_mean"]
    assert found.stats.dto_steps == found.stats.dto_runs == found.stats.probes == 6  # one step a run, from the probe's pass


def test_spread_takes_evenly_spaced_positions():
    assert spread([3, 5, 8, 9, 12, 20], 3) == [3, 8, 20]
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([3, 5], 4) == [3, 5] and spread([3, 5, 7], 1) == [3]


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None
