"""The arith task: seeded generation, split disjointness, exact answers, answer extraction and checking."""

from __future__ import annotations

import re

import pytest

from nabla_lc.bench.arith import (
    DEFAULT_LEVEL,
    LEVELS,
    SPLIT_SEEDS,
    Problem,
    check,
    extract_answer,
    make_problems,
    to_records,
)

_QUESTION = re.compile(r"What is (\d+) (\+|-|times) (\d+)\?")


def _recompute(question: str) -> int:
    a, op, b = _QUESTION.fullmatch(question).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_same_arguments_give_same_problems(level: int) -> None:
    assert make_problems("dev", 30, level) == make_problems("dev", 30, level)
    assert make_problems("test", 30, level, seed=7) == make_problems("test", 30, level, seed=7)


def test_seed_changes_problems_and_defaults_to_split_seed() -> None:
    assert make_problems("dev", 20, 3) == make_problems("dev", 20, 3, seed=SPLIT_SEEDS["dev"])
    assert [p.problem for p in make_problems("dev", 20, 3, seed=1)] != [p.problem for p in make_problems("dev", 20, 3)]


def test_shorter_list_is_prefix_of_longer() -> None:
    assert make_problems("test", 10, 4) == make_problems("test", 25, 4)[:10]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_dev_and_test_share_no_question(level: int) -> None:
    dev = {p.problem for seed in (None, 1, 2) for p in make_problems("dev", 30, level, seed=seed)}
    test = {p.problem for seed in (None, 1, 2) for p in make_problems("test", 30, level, seed=seed)}
    assert dev and test and not dev & test


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_answers_are_exact_and_questions_unique(level: int) -> None:
    problems = make_problems("dev", 30, level)
    assert len({p.problem for p in problems}) == 30
    assert len({p.id for p in problems}) == 30
    for p in problems:
        assert p.level == level
        assert p.final_answer == str(_recompute(p.problem))


def test_exhausted_level_repeats_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    problems = make_problems("dev", 60, 1)  # level 1 has 81 questions, about half of them in dev
    distinct = {p.problem for p in problems}
    assert len(problems) == 60 and len(distinct) < 60
    assert len({p.problem for p in problems[: len(distinct)]}) == len(distinct)  # repeats only once exhausted
    assert "repeating" in caplog.text


def test_levels_grow_harder() -> None:
    largest = [max(abs(int(p.final_answer)) for p in make_problems("dev", 30, level)) for level in sorted(LEVELS)]
    assert largest == sorted(largest) and largest[0] <= 18 and largest[-1] > 1000


def test_only_level_4_has_negative_answers() -> None:
    negative = {level for level in LEVELS for p in make_problems("dev", 60, level) if int(p.final_answer) < 0}
    assert negative == {4}


def test_bad_arguments_fail() -> None:
    with pytest.raises(ValueError, match="split"):
        make_problems("train", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        make_problems("dev", 3, level=99)
    assert DEFAULT_LEVEL in LEVELS


def test_to_records_matches_jsonl_fields() -> None:
    problem = Problem("What is 2 + 3?", "5", 1, "arith-dev-l1-s1000-0")
    assert to_records([problem]) == [
        {"id": "arith-dev-l1-s1000-0", "problem": "What is 2 + 3?", "final_answer": "5", "level": 1}
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("To add 7 and 5, you simply add them together: 7 + 5 = 12.", "12"),
        ("7 + 5 = 12, so the result is \\boxed{12}. Double-check: 12 - 5 = 7.", "12"),
        ("First \\boxed{10}, no wait: \\boxed{\\text{12}}", "12"),
        ("\\boxed{1,234}", "1234"),
        ("The answer is 12. Check: 5 + 7 = 12 and 3 + 4 = 7.", "12"),
        ("So the final answer is: 4,096 apples.", "4096"),
        ("The answer is 12 because 3 + 9 = 12.\n#### 12", "12"),
        ("Step 1: 3 * 4 = 12\n#### 12", "12"),
        ("#### -7", "-7"),
        ("14 - 21 = -7", "-7"),
        ("14 \u2212 21 = \u22127", "-7"),
        ("The difference is x=-7.", "-7"),
        ("23-4 = 19", "19"),
        ("Multiplying gives 1,512 in total", "1512"),
        ("It comes to 12.0", "12"),
        ("It comes to 12.5.", "12.5"),
        ("The answer is \\boxed{", None),
        ("I am not sure how to do that.", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("answer", "final", "expected"),
    [
        ("12", "12", True),
        ("12.0", "12", True),
        ("+12", "12", True),
        ("012", "12", True),
        ("1,512", "1512", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("12.5", "12", False),
        ("13", "12", False),
        (None, "12", False),
        ("twelve", "12", False),
    ],
)
def test_check(answer: str | None, final: str, expected: bool) -> None:
    assert check(answer, final) is expected
