"""The agent's answer turn alone, on dev questions: how should a tool result reach a model whose chat template has
no tool role? (BENCHMARKS.md, "Tools and structured output".)

    python docs/results/agents/answer_turn.py 30

Dev questions from random.Random(1800) (the agent benchmark's questions come from random.Random(18)); each
conversation is the question, the assistant's calculator call, and the right result in one of several renderings;
the embedded SmolLM2 answers greedily, graded by the project's answer rule. Prints one line per rendering and writes
answer_turn.jsonl next to this file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from nabla_lc import NablaReasonerLLM
from nabla_lc.answers import find_answer

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
RENDERINGS = {
    "tool turn (the first version)": lambda r: {"role": "tool", "content": r},
    "Hermes block": lambda r: {"role": "user", "content": f"<tool_response>\n{r}\n</tool_response>"},
    "Hermes block + instruction": lambda r: {"role": "user", "content": f"<tool_response>\n{r}\n</tool_response>\nUse the tool's result to answer the question."},
    "sentence + question": lambda r: {"role": "user", "content": f"The calculator returned {r}. What is the answer to my question?"},
    "line + instruction (shipped)": lambda r: {"role": "user", "content": f"The calculator tool returned: {r}\nAnswer my question with this result."},
    "short line + instruction": lambda r: {"role": "user", "content": f"Result of calculator: {r}\nUse it to answer my question."},
}


def questions(limit: int) -> list[tuple[str, str, int]]:
    rng = random.Random(1800)
    out = []
    for i in range(limit):
        lo, hi, op = (100, 999, "+") if i % 2 == 0 else (10, 99, "*")
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append((f"What is {a} {op} {b}?", f"{a} {op} {b}", a + b if op == "+" else a * b))
    return out


def main() -> None:
    llm = NablaReasonerLLM.embedded(method="greedy", max_new_tokens=48)
    engine = llm.engine
    rows, right = [], dict.fromkeys(RENDERINGS, 0)
    qs = questions(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
    for question, expression, truth in qs:
        for name, render in RENDERINGS.items():
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": CALL % expression}, render(str(truth))]
            [result] = engine.generate([engine.request_from_messages(messages, question=question)], llm.config)
            answer = find_answer(result.text)
            correct = answer is not None and answer.replace(",", "") == str(truth)
            right[name] += correct
            rows.append({"question": question, "rendering": name, "reply": result.text, "correct": correct})
    (Path(__file__).parent / "answer_turn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, count in right.items():
        print(f"{name}: {count}/{len(qs)}")


if __name__ == "__main__":
    main()
