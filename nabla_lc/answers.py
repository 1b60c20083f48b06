"""Finding the final answer in a response: the engine's default extractor (self-consistency and
weighted BoN vote on it) and the first step of the benchmark graders."""

from __future__ import annotations

import re


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces), or ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # ``\boxed 5``: the argument runs to the next ``$`` or line end
        return rest.strip().split("$")[0].split("\n")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None  # unbalanced: the response was cut inside the box


_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def find_answer(text: str) -> str | None:
    """The raw final answer: last ``\\boxed{}``, else "the answer is X", else "#### X", else the last number."""
    boxed = last_boxed(text)
    if boxed:
        return boxed
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip()
            answer = re.sub(r"\.\s.*$", "", answer)  # keep the first sentence
            answer = answer.rstrip(".").strip().strip("$").strip()
            if answer:
                return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None

