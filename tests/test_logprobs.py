"""Request.logprobs: the policy's log-probabilities of a sampled response, from the logits its rollout kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nabla_lc import Engine
from nabla_lc.config import ConfigError


def teacher_forced(engine: Engine, prompt_ids: tuple[int, ...], tokens: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of the policy's logits over the response, from one pass over prompt + response."""
    with engine.lock, torch.no_grad():
        logits = engine.policy.model(input_ids=torch.tensor([list(prompt_ids) + tokens])).logits[0].float()
    return logits[len(prompt_ids) - 1 : -1].log_softmax(-1)


@pytest.mark.parametrize("options", [{"method": "greedy"}, {"method": "bon", "n": 3, "temperature": 1.0, "top_p": 0.9}, {"method": "sc", "n": 2}])
def test_logprobs_are_the_policys_raw_log_probabilities_of_the_response(tiny_engine: Engine, options: dict) -> None:
    request = dataclasses.replace(tiny_engine.request("2+2?", seed=4, max_new_tokens=8), logprobs=3)
    [result] = tiny_engine.generate([request], tiny_engine.config.replace(**options))
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) > 0
    expected = teacher_forced(tiny_engine, request.prompt_ids, result.token_ids)
    for position, (token, entry) in enumerate(zip(result.token_ids, result.logprobs)):
        assert entry.chosen.token == token and entry.chosen.text == tiny_engine.policy.token_text(token)
        assert entry.chosen.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
        top = expected[position].topk(3)
        assert [t.token for t in entry.top] == top.indices.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_do_not_change_the_response(tiny_engine: Engine) -> None:
    config = tiny_engine.config.replace(method="bon", n=2, temperature=1.0)
    plain = tiny_engine.request("1+3?", seed=2, max_new_tokens=8)
    [without] = tiny_engine.generate([plain], config)
    [with_logprobs, other] = tiny_engine.generate([dataclasses.replace(plain, logprobs=0), plain], config)
    assert with_logprobs.token_ids == without.token_ids == other.token_ids
    assert with_logprobs.logprobs is not None and all(p.top == () for p in with_logprobs.logprobs)
    assert without.logprobs is None and other.logprobs is None


def test_methods_that_do_not_return_one_rollout_refuse_logprobs(tiny_engine: Engine) -> None:
    request = dataclasses.replace(tiny_engine.request("2+2?", max_new_tokens=4), logprobs=0)
    for method in ("nabla", "pf", "beam"):
        with pytest.raises(ConfigError, match="returns no logprobs"):
            tiny_engine.generate([request], tiny_engine.config.replace(method=method, n=2))
    with pytest.raises(ValueError, match="Request.logprobs"):
        dataclasses.replace(request, logprobs=-1)
