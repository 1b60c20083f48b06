"""Step-level search (particle filtering, beam search, DVTS): hand-computed runs, seeds, beam selection, accounting."""

import dataclasses
import math

import pytest
import torch

from nabla_lc import ConfigError, Engine, NablaConfig
from nabla_lc.rewards.base import RewardAdapter, Scores
from nabla_lc.strategies import pf, steps
from nabla_lc.strategies.steps import Candidate, Search

from .test_scheduler import until
from .tiny import LinearReward, make_policy

PROMPTS = ["What is 2 + 3?", "What is 4 * 5?", "Add 7 and 8."]
METHODS = [("pf", False), ("beam", False), ("beam", True)]


class TokenReward(RewardAdapter):
    """r(y) = sum_t w[y_t]: each token's own value, so partial scores are exact; counts its calls."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.partial_calls = 0
        self.full_calls = 0

    @property
    def differentiable(self) -> bool:
        return False

    def _values(self, responses):
        return Scores(torch.tensor([float(self.w[list(r)].sum()) for r in responses]), len(responses), sum(map(len, responses)))

    def score(self, prompts, responses):
        self.full_calls += 1
        return self._values(responses)

    def score_partial(self, prompts, responses):
        self.partial_calls += 1
        return self._values(responses)


def _engine(tokenizer, reward=None, uniform=False, **cfg):
    model = make_policy(tokenizer)
    if uniform:  # why: zero output weights give logits of exactly 0, a uniform next token a test can draw by hand
        with torch.no_grad():
            model.lm_head.weight.zero_()
    reward = reward if reward is not None else LinearReward(model.config.vocab_size)
    base = dict(max_new_tokens=12, n=4, step_separator="", step_tokens=3, temperature=1.0, top_p=1.0)
    return Engine(model, tokenizer, reward, NablaConfig(**{**base, **cfg}))


def test_particle_filtering_ends_on_the_hand_computed_particle(tokenizer):
    # a uniform policy, one-token steps, two steps, a reward of summed token values: each draw is reproducible by hand
    vocab = len(tokenizer) + 3
    w = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    reward = TokenReward(w)
    engine = _engine(tokenizer, reward, uniform=True, max_new_tokens=2, step_tokens=1, resample_temperature=0.5)
    config = engine.config.replace(method="pf")
    request = engine.request(PROMPTS[0], seed=11)
    result = engine.generate([request], config)[0]

    ctx = engine.context(config)
    eos = ctx.policy.eos_ids
    slots = [ctx.generator(request, sample=j) for j in range(4)]
    choice = ctx.generator(request, sample=steps.SLOT_CHOICE)
    uniform = torch.zeros(1, vocab).softmax(-1)[0]

    def draw(j):
        return int(torch.multinomial(uniform, 1, generator=slots[j]))

    first = [draw(j) for j in range(4)]
    assert not set(first) & eos  # the seed draws no end of sequence, so both steps run
    weights = (torch.tensor([float(w[t]) for t in first], dtype=torch.float64) / 0.5).softmax(0)
    drawn = torch.multinomial(weights, 4, replacement=True, generator=choice).tolist()
    final = [[first[i]] + ([] if (t := draw(j)) in eos else [t]) for j, i in enumerate(drawn)]
    best = max(range(4), key=lambda j: (float(w[final[j]].sum()), -j))
    assert result.token_ids == final[best]
    assert result.reward == pytest.approx(float(w[final[best]].sum()))
    assert sorted(s["tokens"] for s in result.samples) == sorted(len(f) for f in final)
    assert reward.partial_calls == 1 and reward.full_calls == 1  # step 1 partial, step 2 finished (length)


def test_resampling_follows_the_softmax_of_rewards_and_keeps_dropped_finished_particles():
    rewards = [0.0, math.log(2.0), math.log(4.0)]
    particles = [Candidate([j], r, "eos" if j == 0 else None) for j, r in enumerate(rewards)]
    config = NablaConfig(method="pf", n=3, resample_temperature=1.0)
    ctx = steps.DecodingContext(None, None, config, lambda text: None)  # type: ignore[arg-type]
    search = Search(None, 0, None, [], torch.Generator().manual_seed(4), particles)  # type: ignore[arg-type]
    pf.resample(ctx, search)
    expected = torch.multinomial(torch.tensor([1 / 7, 2 / 7, 4 / 7], dtype=torch.float64), 3, True, generator=torch.Generator().manual_seed(4))
    assert [p.tokens for p in search.live] == [[j] for j in expected.tolist()]
    assert all(p is not q for p in search.live for q in particles)  # copies: extending one never changes another
    assert [p.tokens for p in search.done] == ([] if 0 in expected.tolist() else [[0]])
    cold = Search(None, 0, None, [], torch.Generator().manual_seed(4), [c.copy() for c in particles])  # type: ignore[arg-type]
    pf.resample(steps.DecodingContext(None, None, config.replace(resample_temperature=1e-3), lambda t: None), cold)  # type: ignore[arg-type]
    assert [p.tokens for p in cold.live] == [[2]] * 3 and [p.tokens for p in cold.done] == [[0]]


@pytest.mark.parametrize("method,dvts", METHODS)
def test_fixed_seed_is_deterministic_in_any_batch(tokenizer, method, dvts):
    engine = _engine(tokenizer)
    config = engine.config.replace(method=method, dvts=dvts)
    requests = [engine.request(p, seed=5) for p in PROMPTS]
    together = engine.generate(requests, config)
    again = engine.generate(requests, config)
    assert [(r.token_ids, r.samples) for r in together] == [(r.token_ids, r.samples) for r in again]
    alone = engine.generate([requests[1]], config)[0]
    assert alone.token_ids == together[1].token_ids and alone.samples == together[1].samples
    assert dataclasses.replace(alone.stats, wall_s=0.0) == dataclasses.replace(together[1].stats, wall_s=0.0)
    other = engine.generate([engine.request(p, seed=6) for p in PROMPTS], config)
    assert [r.samples for r in other] != [r.samples for r in together]


@pytest.mark.parametrize("dvts", [False, True])
def test_beam_keeps_the_best_partial_responses_at_each_step(tokenizer, monkeypatch, dvts):
    engine = _engine(tokenizer, n=6, beam_width=2, max_new_tokens=9)
    config = engine.config.replace(method="beam", dvts=dvts)
    history: list[list[Candidate]] = []  # the candidates of each step, after scoring
    starts: list[list[list[int]]] = []  # the prefixes each step extended
    original = steps.extend

    def spy(ctx, searches):
        starts.append([list(c.tokens) for c in searches[0].live])
        yield from original(ctx, searches)
        history.append([c.copy() for c in searches[0].live])

    monkeypatch.setattr(steps, "extend", spy)
    result = engine.generate([engine.request(PROMPTS[0], seed=1)], config)[0]
    assert len(history) >= 2 and starts[0] == [[]] * 6
    finished: list[list[int]] = []
    for step, (candidates, following) in enumerate(zip(history, starts[1:] + [[]])):
        assert len(candidates) == len(starts[step])
        groups = [candidates[i : i + 3] for i in range(0, len(candidates), 3)] if dvts else [candidates]
        kept = []
        for group in groups:
            order = sorted(group, key=lambda c: -c.reward)
            top = order[: 1 if dvts else 2]
            assert all(c.reward >= d.reward for c in top for d in group if d not in top)
            kept += top
        finished += [c.tokens for c in kept if c.finished]
        assert following == [c.tokens for c in kept if not c.finished for _ in range(3)]
    assert sorted(s["tokens"] for s in result.samples) == sorted(len(t) for t in finished)
    assert result.reward == max(s["reward"] for s in result.samples)


@pytest.mark.parametrize("method,dvts", METHODS)
@pytest.mark.parametrize("answer", ["best", "weighted_majority"])
def test_accounting_invariants(tokenizer, method, dvts, answer):
    engine = _engine(tokenizer, step_tokens=0, step_separator="e", max_new_tokens=10)
    config = engine.config.replace(method=method, dvts=dvts, search_answer=answer)
    for r in engine.generate([engine.request(p, seed=2) for p in PROMPTS], config):
        s = r.stats
        assert s.model_calls >= s.model_calls_paper == s.rollout_tokens
        assert s.reward_forward == s.rollouts  # every step rollout is scored once
        assert s.rollout_tokens <= s.policy_forward <= s.rollout_tokens + s.rollouts
        assert s.policy_backward == s.reward_backward == 0
        assert s.response_tokens == len(r.token_ids) <= 10
        assert s.rollouts >= config.n and r.samples
        assert all(x["text"].count("e") >= x["steps"] - 1 for x in r.samples)  # every step but the last ends at the separator
        assert r.reward == pytest.approx(max(x["reward"] for x in r.samples)) or answer == "weighted_majority"


def test_search_needs_a_reward_and_checks_its_settings(tokenizer):
    engine = Engine(make_policy(tokenizer), tokenizer, None, NablaConfig(max_new_tokens=4))
    with pytest.raises(ConfigError, match="'pf' needs a reward"):
        engine.generate([engine.request(PROMPTS[0])], engine.config.replace(method="pf"))
    with pytest.raises(ConfigError, match="beam_width"):
        NablaConfig(method="beam", n=6, beam_width=4)
    NablaConfig(method="beam", n=2, beam_width=4)  # M above n counts as n
    with pytest.raises(ConfigError, match="step_separator"):
        NablaConfig(step_separator="", step_tokens=0)
    with pytest.raises(ConfigError, match="resample_temperature"):
        NablaConfig(resample_temperature=0.0)
    with pytest.raises(ConfigError, match="search_answer"):
        NablaConfig(search_answer="vote")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["pf", "beam"])
def test_a_stop_string_across_two_steps_ends_the_search(tokenizer, method):
    # one-token steps: a two-character stop string is completed by the step after the one that begins it
    engine = _engine(tokenizer, n=1, step_tokens=1)
    config = engine.config.replace(method=method)
    free = engine.generate([engine.request(PROMPTS[1], seed=5)], config)[0]
    assert len(free.token_ids) >= 6, free  # the seed's search runs past the stop string below
    stop = tokenizer.decode(free.token_ids[2:4])
    assert len(stop) == 2
    cut = engine.generate([engine.request(PROMPTS[1], seed=5, stop=[stop])], config)[0]
    before = free.text[: free.text.find(stop)]
    assert (cut.finish_reason, cut.text) == ("stop", before)
    assert cut.stats.rollouts == len(before) + 2  # it ended at the step that completed the stop string


@pytest.mark.parametrize("aggregation", ["sum", "last"])
def test_a_summing_process_reward_is_warned_about(tokenizer, caplog, aggregation):
    vocab = len(tokenizer) + 3
    reward = TokenReward(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))
    reward.kind, reward.aggregation = "process", aggregation  # as ProcessReward and LoRAReward hold them
    engine = _engine(tokenizer, reward, n=2, max_new_tokens=3)
    with caplog.at_level("WARNING", logger="nabla_lc.strategies.steps"):
        engine.generate([engine.request(PROMPTS[0], seed=1)], engine.config.replace(method="pf"))
    warned = [r for r in caplog.records if "sums its step scores" in r.getMessage()]
    assert len(warned) == (aggregation == "sum")


@pytest.mark.parametrize("method", ["pf", "beam"])
def test_a_cancelled_search_takes_no_further_step(tokenizer, method):
    # the reward cancels the call while it scores the first step (as a server does when its client disconnects)
    vocab = len(tokenizer) + 3
    reward = TokenReward(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))
    engine = _engine(tokenizer, reward, n=2, beam_width=1, step_tokens=1, max_new_tokens=12)
    config = engine.config.replace(method=method)
    request = engine.request(PROMPTS[0], seed=3)
    assert engine.generate([request], config)[0].stats.rollouts > 2 * 2  # alone, it takes more than two steps
    reward.partial_calls = 0
    futures = []
    original = reward.score_partial

    def cancelling(prompts, responses):
        futures[0].cancel()
        return original(prompts, responses)

    reward.score_partial = cancelling
    tokens, jobs = engine.scheduler.stats.tokens, engine.scheduler.stats.jobs
    futures.append(engine.submit([request], config))
    until(lambda: engine.scheduler.stats.jobs > jobs, "the scheduler to finish the job")
    assert futures[0].cancelled() and engine.scheduler.stats.cancelled == 1
    assert reward.partial_calls <= 1 and 0 < engine.scheduler.stats.tokens - tokens <= 2  # one step of two one-token rows
