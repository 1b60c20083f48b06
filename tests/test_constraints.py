"""Grammar-constrained decoding: every method's responses stay within the grammar, ∇ proposals within the mask."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
import xgrammar as xgr

from nabla_lc import Engine, NablaConfig
from nabla_lc.engine.constraints import Grammar, compile_constraint, completion_length, scan
from nabla_lc.engine.types import Constraint, Request

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}, "w": {"enum": ["ab", "c"]}},
    "required": ["ok", "n", "w"],
}
PATTERN = r"(yes|no): [0-9]{1,3}"
SEEDS = range(12)


def constrained(engine: Engine, constraint: Constraint, seed: int) -> Request:
    return Request(engine.request("q?").prompt_ids, "q?", seed=seed, max_new_tokens=40, constraint=constraint)


def check_in_grammar(engine: Engine, constraint: Constraint, tokens: list[int]) -> xgr.GrammarMatcher:
    """A fresh matcher that accepted every token (the test fails at the first one outside the grammar)."""
    matcher = xgr.GrammarMatcher(compile_constraint(engine.policy, constraint))
    for i, token in enumerate(tokens):
        assert matcher.accept_token(token), f"token {i} ({engine.policy.token_text(token)!r}) leaves the grammar"
    return matcher


@pytest.mark.parametrize(
    "config",
    [
        NablaConfig(method="greedy"),
        NablaConfig(method="bon", n=4, temperature=1.5),
        NablaConfig(method="sc", n=3, temperature=1.5),
        NablaConfig(method="nabla", n=3, temperature=1.5, dto_steps=2, entropy_threshold=-1.0, grad_threshold=-1.0),
    ],
    ids=lambda c: c.method,
)
def test_constrained_responses_never_leave_the_grammar(tiny_engine: Engine, config: NablaConfig) -> None:
    seeds = {"greedy": 1, "nabla": 3}.get(config.method, len(SEEDS))  # why: ∇ runs DTO at every position; keep it seconds
    for seed in SEEDS[:seeds]:
        for constraint in (Constraint.json_schema(SCHEMA), Constraint.regex(PATTERN)):
            [result] = tiny_engine.generate([constrained(tiny_engine, constraint, seed)], config)
            check_in_grammar(tiny_engine, constraint, result.token_ids)
            assert result.finish_reason == "stop"  # both grammars are finite: they end well within 40 tokens
            if constraint.kind == "regex":
                assert re.fullmatch(PATTERN, result.text), result.text
            else:
                value = json.loads(result.text)
                assert set(value) == {"ok", "n", "w"} and 0 <= value["n"] <= 99 and value["w"] in ("ab", "c")
            for sample in result.samples:
                assert json.loads(sample["text"]) if constraint.kind == "json_schema" else re.fullmatch(PATTERN, sample["text"])


def test_without_a_constraint_the_tiny_model_leaves_the_grammar(tiny_engine: Engine) -> None:
    """The test above is not vacuous: unconstrained, the random policy's text is not JSON."""
    [free] = tiny_engine.generate([Request(tiny_engine.request("q?").prompt_ids, "q?", seed=0)], NablaConfig(method="greedy"))
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_a_constrained_nabla_proposal_is_within_the_mask(tiny_engine: Engine) -> None:
    constraint = Constraint.json_schema(SCHEMA)
    config = NablaConfig(
        method="nabla", n=3, temperature=1.5, tau=2.0, dto_steps=2, step="trust_region", target_kl=3.0,
        entropy_threshold=-1.0, grad_threshold=-1.0, trace=True,
    )
    proposals = 0
    for seed in SEEDS[:5]:
        [result] = tiny_engine.generate([constrained(tiny_engine, constraint, seed)], config)
        for record in result.trace:
            if record.proposed_token is None:
                continue
            proposals += 1
            matcher = check_in_grammar(tiny_engine, constraint, result.token_ids[: record.index])
            proposed = record.proposed_token
            assert matcher.accept_token(proposed), record.proposed_text  # an end token too: only where the grammar may end
    assert proposals >= 5


def test_a_schema_keeps_its_property_order() -> None:
    # xgrammar writes properties in the schema text's order: "reasoning" before "answer" must stay so
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}}}
    assert Constraint.json_schema(schema).spec.index("reasoning") < Constraint.json_schema(schema).spec.index("answer")


def test_accounting_is_unchanged_by_a_constraint(tiny_engine: Engine) -> None:
    """A grammar costs no model call: greedy still makes one pass per sampled token (the end token included)."""
    for constraint in (None, Constraint.regex(PATTERN)):
        request = Request(tiny_engine.request("q?").prompt_ids, "q?", seed=0, max_new_tokens=40, constraint=constraint)
        [result] = tiny_engine.generate([request], NablaConfig(method="greedy"))
        ended_by_eos = result.finish_reason == "stop" and len(result.token_ids) < 40
        assert result.stats.policy_forward == len(result.token_ids) + ended_by_eos


@pytest.mark.parametrize(
    "constraint,match",
    [
        (Constraint.json_schema({"type": "bogus"}), "json_schema.*bogus"),
        (Constraint.json_schema("[1, 2]"), "a JSON schema is an object"),
        (Constraint.json_schema("{not json"), "json_schema"),
        (Constraint.regex("(unclosed"), "regex.*parenthesis"),
        (Constraint.ebnf("root ::= missing_rule"), "ebnf"),
    ],
)
def test_bad_grammars_fail_before_decoding(tiny_engine: Engine, constraint: Constraint, match: str) -> None:
    with pytest.raises(ValueError, match=f"Request.constraint.*{match}"):
        tiny_engine.generate([constrained(tiny_engine, constraint, 0)], NablaConfig(method="greedy"))


def test_constraint_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="Constraint.kind"):
        Constraint("xml", "<a/>")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Constraint.spec"):
        Constraint.regex("")
    with pytest.raises(ValueError, match="Request.constraint"):
        Request((1, 2), "q", constraint="{}")  # type: ignore[arg-type]


def test_an_ebnf_grammar_constrains_sampling(tiny_engine: Engine) -> None:
    grammar = 'root ::= "a" ("b" | "c")* "!"'
    for seed in range(4):
        [result] = tiny_engine.generate([constrained(tiny_engine, Constraint.ebnf(grammar), seed)], NablaConfig(method="bon", n=2, temperature=1.5))
        assert re.fullmatch(r"a[bc]*!", result.text) or (result.finish_reason == "length" and re.fullmatch(r"a[bc]*", result.text))


def test_a_method_that_would_ignore_the_constraint_refuses_it(tiny_engine: Engine) -> None:
    from nabla_lc.methods import MethodSpec, register, unregister

    register(MethodSpec("unconstrained_test", lambda ctx, requests: [], needs_reward=False))
    try:
        with pytest.raises(ValueError, match="'unconstrained_test' does not decode under Request.constraint"):
            tiny_engine.generate([constrained(tiny_engine, Constraint.regex("a"), 0)], NablaConfig(method="unconstrained_test"))
    finally:
        unregister("unconstrained_test")


REASONING = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "done": {"type": "boolean"}},
    "required": ["reasoning", "done"],
}


@pytest.mark.parametrize("method", ["greedy", "bon", "nabla"])
def test_a_json_reply_that_runs_on_in_a_string_is_closed_within_its_budget(tiny_engine: Engine, method: str) -> None:
    """The random policy rarely ends a free string: without the closing rule these replies are cut unfinished."""
    constraint = Constraint.json_schema(REASONING)
    config = NablaConfig(method=method, n=2, temperature=1.5, dto_steps=2)
    for seed in SEEDS[:4]:
        request = Request(tiny_engine.request("q?").prompt_ids, "q?", seed=seed, max_new_tokens=40, constraint=constraint)
        [result] = tiny_engine.generate([request], config)
        check_in_grammar(tiny_engine, constraint, result.token_ids)
        assert set(json.loads(result.text)) == {"reasoning", "done"}, result.text
        assert len(result.token_ids) <= 40


def test_the_closing_rule_measures_the_completion_and_narrows_only_when_it_needs_every_token(tiny_engine: Engine) -> None:
    policy, constraint = tiny_engine.policy, Constraint.json_schema(REASONING)
    head = policy.tokenizer.encode('{"reasoning": "a\\', add_special_tokens=False)  # inside the string, after a backslash
    grammar = Grammar.start(policy, constraint, budget=len(head) + 40)
    grammar.accept(head)
    closing = grammar.closing
    assert closing is not None and closing.in_string and closing.escaped
    # the escaped character, the string's end, then the forced key and the smallest boolean
    assert completion_length(grammar.matcher, True, True, 100) == len('"", "done": false}')
    assert completion_length(grammar.matcher, True, True, 5) == 6  # more than the limit
    escaped = scan(True, False, b'\\"')
    assert escaped == (True, False) and scan(*escaped, b'"}') == (False, False)  # \" stays in the string; " ends it
    free = grammar.allowed()
    assert free.sum() > 1
    for left in (19, 18):  # 18 = the completion's characters: from there only a quote may come
        grammar.closing = replace(closing, budget=closing.position + left)
        narrowed = grammar.allowed()
        texts = {policy.token_text(int(t)) for t in narrowed.nonzero()}
        assert (left == 19 and torch.equal(narrowed, free)) or (left == 18 and texts and all(t.startswith('"') for t in texts)), texts


@pytest.mark.parametrize("error", [RuntimeError("bad schema"), ValueError("bad schema"), TypeError("a bug")])
def test_a_tool_schema_refusal_is_a_value_error_and_a_programming_error_propagates(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from nabla_lc.tool_calls import _json_grammar

    def refusing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(xgr.Grammar, "from_json_schema", refusing)
    expected = TypeError if isinstance(error, TypeError) else ValueError
    with pytest.raises(expected, match="a bug" if expected is TypeError else "JSON schema does not compile: bad schema"):
        _json_grammar(SCHEMA)
