"""``POST /v1/completions``: a plain continuation (no chat template), its shape and text against the engine in-process,
stop strings, and the prompt forms it accepts."""

from __future__ import annotations

import openai
import pytest

from nabla_lc import Engine

from ..server_harness import alone

BON = {"nabla": {"method": "bon", "n": 2}}


def test_text_completion_matches_the_engine(client: openai.OpenAI, tiny_engine: Engine) -> None:
    expected = alone(tiny_engine, "abc", chat=False, seed=2, max_new_tokens=10, method="bon", n=2)
    out = client.completions.create(model="tiny", prompt="abc", max_tokens=10, seed=2, extra_body=BON)
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    [choice] = out.choices
    assert choice.index == 0 and choice.text == expected.text and choice.finish_reason == expected.finish_reason and choice.logprobs is None
    assert out.model_extra["nabla"]["reward"] == pytest.approx(expected.reward)
    assert out.usage.prompt_tokens == expected.stats.prompt_tokens and out.usage.completion_tokens == len(expected.token_ids)


def test_a_list_of_one_prompt_is_that_prompt(client: openai.OpenAI) -> None:
    one = client.completions.create(model="tiny", prompt="abc", max_tokens=6, seed=2, extra_body=BON)
    listed = client.completions.create(model="tiny", prompt=["abc"], max_tokens=6, seed=2, extra_body=BON)
    assert listed.choices[0].text == one.choices[0].text and listed.usage == one.usage


def test_stop_strings_cut_the_text(fake_client: openai.OpenAI) -> None:
    whole = fake_client.completions.create(model="tiny", prompt="q", max_tokens=100, seed=7)
    assert whole.choices[0].text == "Answer to q (seed 7, sample 0). STOP here. The end."
    for stop in ("STOP", ["nothing", "STOP"]):
        out = fake_client.completions.create(model="tiny", prompt="q", max_tokens=100, seed=7, stop=stop)
        assert out.choices[0].text == "Answer to q (seed 7, sample 0). " and out.choices[0].finish_reason == "stop"


def test_the_budget_ends_with_length(fake_client: openai.OpenAI) -> None:
    out = fake_client.completions.create(model="tiny", prompt="q", max_tokens=5)
    assert out.choices[0].text == "Answe" and out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


@pytest.mark.parametrize(("kwargs", "param"), [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")])
def test_unsupported_completion_fields_are_400_naming_them(fake_client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        fake_client.completions.create(model="tiny", prompt="q", max_tokens=2, **kwargs)
    assert caught.value.body["param"] == param and param in caught.value.body["message"]
