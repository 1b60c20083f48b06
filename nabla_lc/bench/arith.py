"""``arith``: seeded short arithmetic questions, graded by exact integer match.

Questions read like ``What is 7 + 5?``. Each split draws from its own fixed base seed (dev 1000, test 2000),
and a question belongs to exactly one split, chosen by a hash of its text, so dev and test never share a
question whatever seed is passed. ``DEFAULT_LEVEL`` was calibrated on the dev split so that
SmolLM2-135M-Instruct leaves room for search (measurements in ``docs/arith.md``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Literal, Sequence

from ..answers import last_boxed

log = logging.getLogger(__name__)

Split = Literal["dev", "test"]

SPLIT_SEEDS: dict[str, int] = {"dev": 1000, "test": 2000}
"""Base seed of each split, used when ``make_problems`` gets no ``seed``."""

LEVELS: dict[int, str] = {
    1: "sums of two single-digit numbers (What is 3 + 4?); dev holds only 37 distinct questions",
    2: "sums of two numbers up to 20, or products of two single-digit numbers (What is 7 times 8?)",
    3: "a two-digit plus a single-digit number, a difference of numbers up to 20 that is not negative, "
    "or a product with a factor 10 to 12",
    4: "sums and differences of two two-digit numbers (possibly negative), or a two-digit number times a single digit",
    5: "sums of two three-digit numbers, or products of two two-digit numbers",
}
"""Difficulty levels, easiest first."""

DEFAULT_LEVEL = 2
"""Where SmolLM2-135M-Instruct, prompted as the benchmark runner does, scores 25% greedy / 75% pass@8 on dev
(``docs/arith.md``)."""

_MAX_IDLE_DRAWS = 1000  # consecutive draws without a new question before a split is taken as exhausted


@dataclass(frozen=True)
class Problem:
    """One question and its reference answer."""

    problem: str
    """The question, e.g. ``What is 7 + 5?``."""
    final_answer: str
    """The exact answer as an integer string, e.g. ``"12"``."""
    level: int
    """Difficulty level, a key of ``LEVELS``."""
    id: str
    """Stable identifier: ``arith-<split>-l<level>-s<seed>-<index>``."""


def make_problems(split: Split, count: int, level: int = DEFAULT_LEVEL, seed: int | None = None) -> list[Problem]:
    """``count`` questions of ``level`` from ``split``, the same for the same arguments.

    ``seed`` defaults to the split's base seed (``SPLIT_SEEDS``). A shorter list is a prefix of a longer one.
    Questions do not repeat within a call unless the split holds fewer than ``count`` distinct ones (then a
    warning is logged and repeats are allowed).
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    seed = SPLIT_SEEDS[split] if seed is None else seed
    rng = random.Random(f"arith/{split}/{level}/{seed}")
    draw = _GENERATORS[level]
    problems: list[Problem] = []
    seen: set[str] = set()
    idle, exhausted = 0, False
    while len(problems) < count:
        text, answer = draw(rng)
        if _split_of(text) != split:
            continue
        if text in seen and not exhausted:
            idle += 1
            exhausted = idle >= _MAX_IDLE_DRAWS
            if exhausted:
                log.warning("arith level %d holds only %d distinct %s questions; repeating", level, len(seen), split)
            continue
        idle = 0
        seen.add(text)
        problems.append(Problem(text, str(answer), level, f"arith-{split}-l{level}-s{seed}-{len(problems)}"))
    return problems


def to_records(problems: Sequence[Problem]) -> list[dict[str, str | int]]:
    """Problems as dicts with the fields of the JSONL benchmark files: ``id, problem, final_answer, level``."""
    return [{"id": p.id, "problem": p.problem, "final_answer": p.final_answer, "level": p.level} for p in problems]


_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")  # a minus right after a word is an operator
_MARKERS = (re.compile(r"answer\s+is", re.IGNORECASE), re.compile(r"####"))


def extract_answer(text: str) -> str | None:
    """The final number in a model's response, normalized (``"1,234"`` → ``"1234"``), or None.

    Looks, in order, at the last ``\\boxed{...}``, the text after the last "the answer is", the text after
    the last ``####``, and finally the whole text; from the first of these that holds a number it returns
    the last number (boxed, whole text) or the first one (after a marker). Whole numbers come back as
    integer strings; a number with a non-zero fraction keeps it (``"12.5"``), so it never equals an integer.
    """
    text = text.replace("\u2212", "-")  # the Unicode minus sign
    boxed = last_boxed(text)
    if boxed is not None:
        numbers = _NUMBER.findall(boxed.replace(" ", ""))
        if numbers:
            return _normalize(numbers[-1])
    for marker in _MARKERS:
        found = list(marker.finditer(text))
        if found:
            number = _NUMBER.search(text, found[-1].end())
            if number:
                return _normalize(number.group())
    numbers = _NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def check(answer: str | None, final_answer: str) -> bool:
    """Whether an extracted answer equals the reference as a number (``"12"``, ``"12.0"`` and ``"+12"`` match 12)."""
    if answer is None:
        return False
    mine, reference = _normalize(answer), _normalize(final_answer)
    return mine is not None and mine == reference


def _normalize(number: str) -> str | None:
    """Canonical string of a number: no commas, spaces or leading zeros, integral values without fraction."""
    try:
        value = Decimal(number.replace(",", "").replace(" ", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _split_of(question: str) -> str:
    """The split a question belongs to, from a hash of its text (about half each)."""
    return "dev" if hashlib.sha256(question.encode()).digest()[0] % 2 == 0 else "test"


def _sum(a: int, b: int) -> tuple[str, int]:
    return f"What is {a} + {b}?", a + b


def _difference(a: int, b: int) -> tuple[str, int]:
    return f"What is {a} - {b}?", a - b


def _product(a: int, b: int) -> tuple[str, int]:
    return f"What is {a} times {b}?", a * b


def _level1(rng: random.Random) -> tuple[str, int]:
    return _sum(rng.randint(1, 9), rng.randint(1, 9))


def _level2(rng: random.Random) -> tuple[str, int]:
    if rng.random() < 0.5:
        return _sum(rng.randint(1, 20), rng.randint(1, 20))
    return _product(rng.randint(2, 9), rng.randint(2, 9))


def _level3(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(3)
    if kind == 0:
        return _sum(rng.randint(10, 99), rng.randint(1, 9))
    if kind == 1:
        a = rng.randint(2, 20)
        return _difference(a, rng.randint(1, a))
    return _product(rng.randint(10, 12), rng.randint(2, 12))


def _level4(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(3)
    if kind == 0:
        return _sum(rng.randint(10, 99), rng.randint(10, 99))
    if kind == 1:
        return _difference(rng.randint(10, 99), rng.randint(10, 99))
    return _product(rng.randint(10, 99), rng.randint(2, 9))


def _level5(rng: random.Random) -> tuple[str, int]:
    if rng.random() < 0.5:
        return _sum(rng.randint(100, 999), rng.randint(100, 999))
    return _product(rng.randint(10, 99), rng.randint(10, 99))


_GENERATORS: dict[int, Callable[[random.Random], tuple[str, int]]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}
