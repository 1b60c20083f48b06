"""Swap consistency: the reward training term that makes the reward's input gradient predict one-token swaps."""

import pytest
import torch

from nabla_lc import Engine, Stats
from nabla_lc.bench import arith
from nabla_lc.bench.reward_recipe import swap_groups
from nabla_lc.diagnose import reward_gradient
from nabla_lc.rewards import LoRAReward
from nabla_lc.rewards import train as train_mod
from nabla_lc.rewards.train import Record, SwapGroup, swap_changes

from .tiny import make_policy


def _reward(tok, seed=4):
    reward = LoRAReward(make_policy(tok), tok, rank=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in reward.adapter_parameters():
            p.normal_(0, 0.3)
    return reward


def _groups(tok):
    out = []
    for a in range(4):
        response = tuple(tok(f"So {a} + 2 = {a + 2}.", add_special_tokens=False)["input_ids"])
        alternatives = tuple(tok.convert_tokens_to_ids(c) for c in "7xQ")
        out.append(SwapGroup(f"What is {a} + 2?", response, 3 + a % 3, alternatives, True, (False, False, True)))
    return out


def test_swap_changes_are_the_diagnosis_swap_test(tok):
    """The predicted change trained on is g·(e_j − e_y) of diagnose's reward gradient; the actual one is the scores'."""
    reward = _reward(tok)
    engine = Engine(reward.model, tok, reward)
    for group in _groups(tok)[:2]:
        predicted, r0, r1 = swap_changes(reward, group)
        t, response = group.position, list(group.response)
        g = reward_gradient(engine, group.prompt, response[:t], response[t:], Stats())
        expected = torch.stack([g[j] - g[response[t]] for j in group.alternatives])
        torch.testing.assert_close(predicted.detach(), expected, rtol=1e-3, atol=1e-5)
        scores = engine.context().score(group.prompt, [response] + [group.swapped(j) for j in group.alternatives], Stats())
        torch.testing.assert_close(r0.detach(), torch.tensor(scores[0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r1.detach(), torch.tensor(scores[1:]), rtol=1e-4, atol=1e-5)


def _miss(reward, groups):
    total = 0.0
    for group in groups:
        predicted, r0, r1 = swap_changes(reward, group)
        actual = (r1 - r0).detach()
        total += float(((predicted.detach() - actual) ** 2).mean() / ((actual**2).mean() + 1e-4))
    return total / len(groups)


def test_training_with_swaps_makes_the_gradient_predict_them(tok):
    reward = _reward(tok)
    groups = _groups(tok)
    records = [Record(g.prompt, tok.decode(list(g.response)), True) for g in groups]
    records += [Record(g.prompt, "No.", False) for g in groups]
    before = _miss(reward, groups)
    reward, report = train_mod.train_reward(
        reward.model, tok, records, reward=reward, swaps=groups, swap_weight=1.0, lr=3e-3, batch_size=2, epochs=12,
        max_steps=24, heldout=0.0, progress=False,
    )
    assert report.steps == 24 and report.swap_groups == len(groups) and report.final_swap_loss is not None
    assert _miss(reward, groups) < 0.5 * before, before


def test_swap_groups_from_the_policy_and_the_checker(tok):
    policy = make_policy(tok)
    problems = arith.make_problems("dev", 3)
    records = [Record(p.problem, f"The answer is \\boxed{{{p.final_answer}}}.", True) for p in problems]
    answers = {p.problem: p.final_answer for p in problems}
    groups = swap_groups(policy, tok, records, answers, count=3, k=3, seed=0, min_entropy=0.0, progress=False)
    assert len(groups) == 3
    for g in groups:
        assert len(g.alternatives) == 3 and g.response[g.position] not in g.alternatives
        assert len(set(g.alternatives)) == 3
        for j, label in zip(g.alternatives, g.swapped_correct):
            assert label == arith.check(arith.extract_answer(tok.decode(g.swapped(j))), answers[g.prompt])
    assert swap_groups(policy, tok, records, answers, count=3, min_entropy=1e9, progress=False) == []


@pytest.fixture(scope="module")
def tok():
    from .tiny import make_tokenizer

    return make_tokenizer()
