"""``POST /v1/completions``: a plain continuation (no chat template), its shape and text against the engine in-process,
stop strings, and the prompt forms it accepts."""

from __future__ import annotations

import httpx
import openai
import pytest
from langchain_openai import OpenAI

from nabla_lc import Engine

from ..fake_engine import FakeEngine
from ..server_harness import API_KEY, AUTH, alone

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


def test_a_list_of_prompts_is_each_prompt_sent_alone(client: openai.OpenAI) -> None:
    prompts = ["abc", "12+3=", "abc"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, seed=2, extra_body=BON)
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, seed=2, extra_body=BON) for p in prompts]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [(c.text, c.finish_reason) for c in out.choices] == [(a.choices[0].text, a.choices[0].finish_reason) for a in alone]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(out.usage, field) == sum(getattr(a.usage, field) for a in alone)
    nabla = out.model_extra["nabla"]
    assert [c["index"] for c in nabla["choices"]] == [0, 1, 2] and nabla["choices"][1]["reward"] == pytest.approx(alone[1].model_extra["nabla"]["reward"])


def test_prompts_times_n_choices_in_openai_order(fake_client: openai.OpenAI) -> None:
    out = fake_client.completions.create(model="tiny", prompt=["p", "q"], n=2, max_tokens=100, seed=7, stop="STOP")
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt k's choice j is choices[k * n + j], as OpenAI orders them
    assert texts == [f"Answer to {p} (seed {7 + j}, sample 0). " for p in "pq" for j in range(2)]
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == sum(len(t) + 5 for t in texts)  # "STOP " is decoded


def test_langchain_openai_batch_sends_a_list_of_prompts(fake_url: str, fake_engine: FakeEngine) -> None:
    llm = OpenAI(base_url=fake_url, api_key=API_KEY, model="tiny", max_tokens=100, seed=7, max_retries=0, batch_size=3)
    calls = len(fake_engine.calls)
    assert llm.batch(["a", "b", "c"], stop=["STOP"]) == [f"Answer to {p} (seed 7, sample 0). " for p in "abc"]
    assert llm.invoke("b", stop=["STOP"]) == "Answer to b (seed 7, sample 0). "
    assert len(fake_engine.calls) - calls == 4  # one engine call per prompt; the batch was one HTTP request


@pytest.mark.parametrize(
    ("prompt", "extra", "param", "says"),
    [
        (["abc", ""], {}, "prompt.1", "empty"),
        ([], {}, "prompt", "empty list"),
        ([1, 2, 3], {}, "prompt", "tokenized_requests=False"),
        ([[1, 2], [3]], {}, "prompt", "token-id prompts"),
        (["a"] * 33, {}, "prompt", "cap is 32"),
        (["a", "b"], {"stream": True}, "prompt", "a stream carries one prompt"),
    ],
)
def test_bad_prompts_are_400_naming_them(url: str, prompt: list, extra: dict, param: str, says: str) -> None:
    out = httpx.post(url + "/completions", headers=AUTH, json={"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra}, timeout=60)
    error = out.json()["error"]
    assert out.status_code == 400 and error["param"] == param and says in error["message"], error


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
