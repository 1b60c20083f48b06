"""What the engine does with what a reward returns: non-finite rewards, wrong shapes, a too-small embedding."""

import logging
import math
import warnings

import pytest
import torch

from nabla_lc import Engine, NablaConfig
from nabla_lc.rewards.base import RewardOutputError, Scores, SoftScore
from nabla_lc.rewards.vocab import VocabMismatchError

from .tiny import LinearReward, make_policy

SEARCH = dict(entropy_threshold=0.0, grad_threshold=0.0, dto_steps=2)  # optimize every position


class FixedReward(LinearReward):
    """Scores each batch with the next values of a fixed list (cycled); soft scores as :class:`LinearReward`."""

    def __init__(self, vocab_size: int, values: list[float]) -> None:
        super().__init__(vocab_size)
        self.values, self.calls = values, 0

    def score(self, prompts, responses):
        start, self.calls = self.calls, self.calls + len(responses)
        out = [self.values[(start + j) % len(self.values)] for j in range(len(responses))]
        return Scores(torch.tensor(out), len(responses), 0)


class WrongShapeReward(LinearReward):
    def score(self, prompts, responses):
        return Scores(torch.zeros(len(responses), 2), len(responses), 0)


class DetachedSoftReward(LinearReward):
    def score_soft(self, prefix, y):
        return SoftScore(torch.zeros(3), 1, y.shape[0])


def _engine(tokenizer, reward, **cfg):
    return Engine(make_policy(tokenizer), tokenizer, reward, NablaConfig(**{"max_new_tokens": 8, **cfg}))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_best_of_n_ranks_a_nonfinite_reward_last_with_a_warning_and_a_count(tokenizer, caplog, bad):
    engine = _engine(tokenizer, None)
    engine.reward = FixedReward(engine.policy.vocab_size, [bad, -0.198, -0.528, -0.767])
    with caplog.at_level(logging.WARNING, logger="nabla_lc.engine.context"):
        [result] = engine.generate([engine.request("What is 2 + 3?")], NablaConfig(method="bon", n=4, max_new_tokens=8))
    assert result.reward == pytest.approx(-0.198)
    assert result.stats.nonfinite_rewards == 1
    assert "FixedReward gave 1 of 4 responses a NaN or infinite reward" in caplog.text


def test_weighted_bon_leaves_nonfinite_rewards_out_of_the_vote(tokenizer):
    engine = _engine(tokenizer, None)
    engine.reward = FixedReward(engine.policy.vocab_size, [math.inf, -1.0, -1.0, -1.0])
    config = NablaConfig(method="weighted_bon", n=4, max_new_tokens=8)
    [result] = engine.generate([engine.request("What is 2 + 3?")], config, extract_answer=lambda text: "A" if len(text) % 2 else "B")
    assert result.reward == -1.0 and result.stats.nonfinite_rewards == 1


def test_selecting_fewer_samples_counts_only_their_nonfinite_rewards(tokenizer):
    engine = _engine(tokenizer, None)
    engine.reward = FixedReward(engine.policy.vocab_size, [-1.0, -2.0, math.nan, -3.0])
    [sample_set] = engine.sample([engine.request("What is 2 + 3?")], NablaConfig(method="bon", n=4), scored=True)
    assert engine.select(sample_set, NablaConfig(method="bon", n=2)).stats.nonfinite_rewards == 0
    assert engine.select(sample_set, NablaConfig(method="bon", n=4)).stats.nonfinite_rewards == 1


def test_nabla_accepts_a_finite_proposal_over_a_nan_current_and_warns(tokenizer, caplog):
    engine = _engine(tokenizer, None, n=4, **SEARCH)
    engine.reward = FixedReward(engine.policy.vocab_size, [math.nan, -5.0])  # every comparison: current NaN, proposal finite
    with caplog.at_level(logging.WARNING, logger="nabla_lc.engine.context"):
        [result] = engine.generate([engine.request("What is 2 + 3?", seed=0)])
    compared = [r for r in result.trace if r.accepted is not None]
    assert compared and all(r.accepted for r in compared)
    assert result.reward == -5.0
    assert result.stats.nonfinite_rewards == len(compared)
    assert "NaN or infinite reward" in caplog.text


def test_a_reward_of_the_wrong_shape_fails_naming_the_adapter(tokenizer):
    engine = _engine(tokenizer, None)
    engine.reward = WrongShapeReward(engine.policy.vocab_size)
    with pytest.raises(RewardOutputError, match=r"WrongShapeReward\.score returned values of shape \(2, 2\) for 2 responses"):
        engine.generate([engine.request("What is 2 + 3?")], NablaConfig(method="bon", n=2, max_new_tokens=8))


def test_a_soft_reward_that_is_not_one_differentiable_number_fails_naming_the_adapter(tokenizer):
    engine = _engine(tokenizer, None, n=2, **SEARCH)
    engine.reward = DetachedSoftReward(engine.policy.vocab_size)
    with pytest.raises(RewardOutputError, match=r"DetachedSoftReward\.score_soft returned shape \(3,\), requires_grad=False"):
        engine.generate([engine.request("What is 2 + 3?", seed=0)])


def test_a_reward_embedding_smaller_than_its_tokenizer_fails_before_any_decoding(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from nabla_lc.rewards import SequenceClassifierReward

    small = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=len(tokenizer) - 5, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    ).eval()
    with pytest.raises(VocabMismatchError, match=rf"input embedding has {len(tokenizer) - 5} rows but its tokenizer has {len(tokenizer)} tokens"):
        Engine(make_policy(tokenizer), tokenizer, SequenceClassifierReward(small, tokenizer, tokenizer))


def test_decoding_uses_no_deprecated_transformers_argument(tokenizer):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (FutureWarning on every call with the old name)."""
    from .tiny import make_classifier_reward

    engine = _engine(tokenizer, make_classifier_reward(tokenizer), n=3, **SEARCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for method in ("nabla", "bon"):
            engine.generate([engine.request("What is 2 + 3?", seed=0)], engine.config.replace(method=method))
