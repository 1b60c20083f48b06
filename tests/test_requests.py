"""Validation of settings and requests: every input either validates or raises the documented error naming its field."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nabla_lc import ConfigError, Engine, NablaConfig
from nabla_lc.cli import main
from nabla_lc.engine.types import Request

from .tiny import LinearReward, make_policy

# why no deadline: the suite must pass on a loaded machine, so no verdict may depend on speed
PROPERTY = settings(max_examples=300, deadline=None)

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)), max_size=3),
    st.tuples(st.one_of(st.none(), st.integers(), st.text(max_size=3))),
    st.sampled_from(["nabla", "bon", "all", "first", "likelihood", "error"]),
)
CONFIG_FIELDS = [f.name for f in dataclasses.fields(NablaConfig)]


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), ANY_VALUE, min_size=1, max_size=3))
def test_any_config_validates_or_raises_a_config_error_naming_a_field_it_was_given(changes):
    try:
        config = NablaConfig.from_dict(changes)
    except ConfigError as err:
        assert any(f"NablaConfig.{name}" in str(err) for name in changes), str(err)
    else:
        assert NablaConfig.from_dict(config.to_dict()) == config


@PROPERTY
@given(
    prompt_ids=st.one_of(st.tuples(st.integers(min_value=-2, max_value=50)), st.lists(st.integers(0, 50), max_size=2), ANY_VALUE),
    reward_prompt=st.one_of(st.text(max_size=5), ANY_VALUE),
    seed=ANY_VALUE,
    max_new_tokens=ANY_VALUE,
    stop=ANY_VALUE,
)
def test_any_request_validates_or_raises_a_value_error_naming_a_field(prompt_ids, reward_prompt, seed, max_new_tokens, stop):
    try:
        request = Request(prompt_ids, reward_prompt, seed, max_new_tokens, stop)
    except ValueError as err:
        assert str(err).startswith(("Request.prompt_ids", "Request.reward_prompt", "Request.seed", "Request.max_new_tokens", "Request.stop"))
    else:
        assert request.max_new_tokens is None or request.max_new_tokens >= 1
        assert request.stop is None or all(isinstance(s, str) and s for s in request.stop)


@pytest.fixture(scope="module")
def engine(tokenizer):
    model = make_policy(tokenizer)
    return Engine(model, tokenizer, LinearReward(model.config.vocab_size), NablaConfig(max_new_tokens=6))


@PROPERTY
@given(prompt=st.one_of(st.text(max_size=12), ANY_VALUE))
def test_any_prompt_makes_a_request_or_raises_naming_the_prompt(engine, prompt):
    try:
        request = engine.request(prompt)
    except TypeError as err:
        assert not isinstance(prompt, str) and str(err).startswith("prompt must be a str")
    except ValueError as err:
        assert isinstance(prompt, str) and "prompt" in str(err)
    else:
        assert request.reward_prompt == prompt and request.prompt_ids


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_a_request_budget_below_one_is_an_error_not_an_empty_response_or_the_default(engine, budget):
    with pytest.raises(ValueError, match=r"Request\.max_new_tokens must be None \(the config's\) or an integer >= 1"):
        engine.request("What is 2 + 3?", max_new_tokens=budget)


def test_a_request_budget_of_one_decodes_one_token(engine):
    [result] = engine.generate([engine.request("What is 2 + 3?", max_new_tokens=1)], engine.config.replace(method="greedy"))
    assert len(result.token_ids) == 1


def test_a_prompt_that_is_not_a_string_is_a_type_error_naming_it(engine):
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        engine.request(123)
    with pytest.raises(TypeError, match="system must be a str, got bytes"):
        engine.request("hi", system=b"be brief")
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] must be a str, got NoneType"):
        engine.request_from_messages([{"role": "user", "content": None}])


def test_undecodable_text_is_a_value_error_naming_where(engine):
    undecodable = b"What is 2 \xff 3?".decode("utf-8", "surrogateescape")  # how bad bytes in argv or a file arrive
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode text: surrogates not allowed at index 10"):
        engine.request(undecodable)
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] is not valid Unicode text"):
        engine.request_from_messages([{"role": "system", "content": "hi"}, {"role": "user", "content": "lone \ud800"}])


@pytest.mark.parametrize("stop", [[None], [""], [3]])
def test_stop_entries_must_be_non_empty_strings(engine, stop):
    with pytest.raises(ValueError, match=r"Request\.stop must be None \(the config's\) or a tuple of non-empty strings"):
        engine.request("hi", stop=stop)


def test_expected_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["solve", "What is 2 + 3?", "--policy", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nabla-lc: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "no-such-model" in err
    assert main(["bench", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"), "--reward", "none"]) == 2
    assert capsys.readouterr().err.startswith("nabla-lc: error: --data")


def test_config_errors_name_the_field_that_makes_another_invalid():
    with pytest.raises(ConfigError, match=r"NablaConfig\.min_lr .*NablaConfig\.lr"):
        NablaConfig(lr=1e-4)
    with pytest.raises(ConfigError, match=r"NablaConfig\.entropy_threshold must be a finite number"):
        NablaConfig(entropy_threshold=10**400)  # too large for a float: once an OverflowError
    with pytest.raises(ConfigError, match=r"NablaConfig\.stop must be a tuple"):
        NablaConfig().replace(stop="\n\n")  # once split into the one-character stops "\n", "\n"


def test_solve_s_trace_page_is_not_the_config_s_trace_switch(tmp_path):
    import argparse

    from nabla_lc.cli import flags, solve

    parser = argparse.ArgumentParser()
    solve.add_parsers(parser.add_subparsers())
    args = parser.parse_args(["solve", "q", "--trace", str(tmp_path / "page.html"), "--no-gradient-cache"])
    config = flags.config_from_args(args)  # once NablaConfig(trace="…/page.html"), a str where a bool belongs
    assert config.trace is True and config.gradient_cache is False
