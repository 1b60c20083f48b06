"""Agents on the embedded SmolLM2-135M-Instruct: the measurements of BENCHMARKS.md, "Tools and structured output".

    python docs/results/agents/agent_bench.py agent --method greedy --limit 50
    python docs/results/agents/agent_bench.py agent --method greedy --limit 50 --plain-tool [--tool-use model] [--response-format]
    python docs/results/agents/agent_bench.py agent --method nabla --limit 10
    python docs/results/agents/agent_bench.py plain --method greedy --limit 50
    python docs/results/agents/agent_bench.py report
    python docs/results/agents/agent_bench.py structured --method bon --limit 20
    python docs/results/agents/agent_bench.py dspy --limit 20
    python docs/results/agents/agent_bench.py react --limit 20 --max-new-tokens 200

Agent rows: ``correct`` grades the final message with the project's answer rule (``nabla_lc.answers.find_answer``:
a box, "the answer is", else the last number); ``mentions`` says whether the right number appears in it as a
number at all; ``tool_result_correct`` whether a calculator result was the right number.

Each run writes one JSON line per question to docs/results/agents/<task>-<method>.jsonl (written as it goes)
and prints a summary line. Questions: three-digit additions and two-digit products, alternating, drawn from
random.Random(18) (the issue's number), so every run sees the same questions.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from nabla_lc.answers import find_answer

OUT = Path(__file__).resolve().parent


def questions(limit: int) -> list[tuple[str, int]]:
    """(question, answer): three-digit additions and two-digit products, alternating."""
    rng = random.Random(18)
    out = []
    for i in range(limit):
        if i % 2 == 0:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            out.append((f"What is {a} + {b}?", a + b))
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append((f"What is {a} * {b}?", a * b))
    return out


def calculator_tool(plain: bool = False):
    """The calculator; ``plain``: its argument is a bare ``str`` (as a user writes it, and docs/frontends.md shows),
    else a ``str`` with a pattern of integers and operators."""
    from langchain_core.tools import tool

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression of integers and + - * /."""
        import ast
        import operator

        ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.USub: operator.neg}

        def value(node: ast.AST) -> float:
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
                return node.value
            if isinstance(node, ast.BinOp) and type(node.op) in ops:
                return ops[type(node.op)](value(node.left), value(node.right))
            if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
                return ops[type(node.op)](value(node.operand))
            raise ValueError(f"unsupported expression {expression!r}")

        try:
            result = value(ast.parse(expression, mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError) as err:
            return f"error: {err}"
        return str(int(result)) if float(result).is_integer() else str(result)

    class Expression(BaseModel):
        expression: Annotated[str, Field(pattern=r"^[0-9]+( *[-+*/] *[0-9]+)+$")]

    return tool(calculator) if plain else tool(args_schema=Expression)(calculator)


def options(method: str) -> dict:
    return {"greedy": {"method": "greedy"}, "bon": {"method": "bon", "n": 4}, "nabla": {"method": "nabla", "n": 4}}[method]


def run_agent(method: str, limit: int, max_new_tokens: int, resume: bool = False, plain: bool = False, tool_use: str = "call_then_answer", structured: bool = False) -> None:
    """``create_agent`` with the calculator; ``structured``: with ``response_format=Answer`` (the answer is read from
    the structured response). The file is agent-<method>[-plain][-<tool_use>][-structured].jsonl."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langgraph.errors import GraphRecursionError

    from nabla_lc import ChatNablaReasoner

    chat = ChatNablaReasoner.embedded(tool_use=tool_use, max_new_tokens=max_new_tokens, **options(method))
    agent = create_agent(chat, tools=[calculator_tool(plain)], response_format=Answer if structured else None)
    suffix = "-plain" * plain + f"-{tool_use}" * (tool_use != "call_then_answer") + "-structured" * structured
    path = OUT / f"agent-{method}{suffix}.jsonl"
    rows = [json.loads(line) for line in path.open()] if resume and path.exists() else []
    with path.open("a" if resume else "w") as out:
        for question, truth in questions(limit)[len(rows) :]:
            start = time.perf_counter()
            messages, state, error = [], {}, None
            # why: stream the state, so a run that hits the recursion limit (the model calls tools again and again)
            # still has its messages; it counts as a wrong answer
            try:
                for state in agent.stream({"messages": [HumanMessage(question)]}, {"recursion_limit": 6}, stream_mode="values"):
                    messages = state["messages"]
            except GraphRecursionError as err:
                error = type(err).__name__
            calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
            final = messages[-1].content if isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls else ""
            if structured:
                response = state.get("structured_response")
                final = str(response.answer) if isinstance(response, Answer) else ""
            answer = find_answer(final)
            row = {
                "question": question,
                "truth": truth,
                "tool_calls": [c["args"] for c in calls],
                "empty_arguments": sum(any(v in ("", None) for v in c["args"].values()) or not c["args"] for c in calls),
                "tool_results": [m.content for m in messages if isinstance(m, ToolMessage)],
                "final": final,
                "answer": answer,
                "correct": answer is not None and answer.replace(",", "") == str(truth),
                "mentions": str(truth) in re.findall(r"-?\d+", final.replace(",", "")),
                "tool_result_correct": str(truth) in [m.content for m in messages if isinstance(m, ToolMessage)],
                "model_calls": sum(m.response_metadata.get("nabla", {}).get("model_calls", 0) for m in messages if isinstance(m, AIMessage)),
                "error": error,
                "wall_s": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    summary = {
        "task": "agent",
        "method": method,
        "questions": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "mentions_rate": sum(r["mentions"] for r in rows) / len(rows),
        "tool_result_correct_rate": sum(r["tool_result_correct"] for r in rows) / len(rows),
        "tool_call_rate": sum(bool(r["tool_calls"]) for r in rows) / len(rows),
        "empty_arguments": sum(r.get("empty_arguments", 0) for r in rows),
        "errors": sum(bool(r.get("error")) for r in rows),
        "mean_model_calls": sum(r["model_calls"] for r in rows) / len(rows),
    }
    print(json.dumps(summary))


def run_plain(method: str, limit: int, max_new_tokens: int) -> None:
    """The model alone: the same questions, no tools, graded like the agent's final message."""
    from nabla_lc import ChatNablaReasoner

    chat = ChatNablaReasoner.embedded(max_new_tokens=max_new_tokens, **options(method))
    path = OUT / f"plain-{method}.jsonl"
    rows = []
    with path.open("w") as out:
        for question, truth in questions(limit):
            start = time.perf_counter()
            final = chat.invoke(question).text
            answer = find_answer(final)
            row = {
                "question": question,
                "truth": truth,
                "final": final,
                "answer": answer,
                "correct": answer is not None and answer.replace(",", "") == str(truth),
                "mentions": str(truth) in re.findall(r"-?\d+", final.replace(",", "")),
                "wall_s": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    accuracy, mentions = sum(r["correct"] for r in rows) / len(rows), sum(r["mentions"] for r in rows) / len(rows)
    print(json.dumps({"task": "plain", "method": method, "questions": len(rows), "accuracy": accuracy, "mentions_rate": mentions}))


class Answer(BaseModel):
    """The answer to an arithmetic question."""

    answer: int = Field(description="the result")


def run_structured(method: str, limit: int, max_new_tokens: int) -> None:
    from nabla_lc import ChatNablaReasoner

    chat = ChatNablaReasoner.embedded(max_new_tokens=max_new_tokens, **options(method))
    runnable = chat.with_structured_output(Answer, include_raw=True)
    path = OUT / f"structured-{method}.jsonl"
    rows = []
    with path.open("w") as out:
        for question, truth in questions(limit):
            start = time.perf_counter()
            got = runnable.invoke(question)
            parsed = got["parsed"]
            row = {
                "question": question,
                "truth": truth,
                "raw": got["raw"].content,
                "valid": isinstance(parsed, Answer),
                "correct": isinstance(parsed, Answer) and parsed.answer == truth,
                "error": str(got["parsing_error"]) if got["parsing_error"] else None,
                "wall_s": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(json.dumps({"task": "structured", "method": method, "questions": len(rows), "valid": sum(r["valid"] for r in rows), "correct": sum(r["correct"] for r in rows)}))


def run_dspy(method: str, limit: int, max_new_tokens: int) -> None:
    import dspy

    from nabla_lc import NablaReasonerLLM

    llm = NablaReasonerLLM.embedded(max_new_tokens=max_new_tokens, **options(method))
    dspy.configure(lm=llm.as_dspy_lm(cache=False), adapter=dspy.JSONAdapter())
    run_program("dspy", method, dspy.ChainOfThought("question -> answer: int"), limit)


def run_react(method: str, limit: int, max_new_tokens: int) -> None:
    """DSPy ``ReAct`` with the calculator (the same function as the agent's tool) under ``GrammarJSONAdapter``."""
    import dspy

    from nabla_lc import NablaReasonerLLM
    from nabla_lc.integrations.dspy import GrammarJSONAdapter

    calculator = calculator_tool()

    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression of integers and + - * /."""
        return calculator.func(expression)

    def trajectory(prediction) -> dict:
        steps = prediction.trajectory if prediction is not None else {}
        calls = [v for k, v in steps.items() if k.startswith("tool_name_") and v == "calc"]
        return {"tool_calls": len(calls), "trajectory": {k: str(v)[:200] for k, v in steps.items()}}

    llm = NablaReasonerLLM.embedded(max_new_tokens=max_new_tokens, **options(method))
    dspy.configure(lm=llm.as_dspy_lm(cache=False), adapter=GrammarJSONAdapter())
    run_program("react", method, dspy.ReAct("question -> answer: int", tools=[calc], max_iters=3), limit, trajectory)


def run_program(task: str, method: str, program, limit: int, details=lambda prediction: {}) -> None:
    """Run a DSPy program on the questions; a row per question in docs/results/agents/<task>-<method>.jsonl."""
    path = OUT / f"{task}-{method}.jsonl"
    rows = []
    with path.open("w") as out:
        for question, truth in questions(limit):
            start = time.perf_counter()
            try:
                prediction = program(question=question)
                answer, error = prediction.answer, None
            except Exception as err:  # why: a parse failure is what this run counts
                prediction, answer, error = None, None, f"{type(err).__name__}: {err}"[:300]
            row = {"question": question, "truth": truth, "answer": answer, "parsed": error is None, "correct": answer == truth}
            row |= {**details(prediction), "error": error, "wall_s": round(time.perf_counter() - start, 1)}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(json.dumps({"task": task, "method": method, "questions": len(rows), "parsed": sum(r["parsed"] for r in rows), "correct": sum(r["correct"] for r in rows)}))


def report() -> None:
    """A summary line per results file in this folder (a partial run counts the rows it has)."""
    for path in sorted(OUT.glob("*-*.jsonl")):  # <task>-<method>.jsonl (answer_turn.py writes answer_turn.jsonl)
        rows = [json.loads(line) for line in path.open()]
        if not rows:
            continue
        counts = {key: sum(bool(r[key]) for r in rows) for key in ("correct", "mentions", "tool_result_correct", "tool_calls", "valid", "parsed") if key in rows[0]}
        calls = [r["model_calls"] for r in rows if "model_calls" in r]
        extra = f", mean model calls {sum(calls) / len(calls):.1f}" if calls else ""
        if "empty_arguments" in rows[0]:
            extra += f", empty arguments {sum(r['empty_arguments'] for r in rows)}, recursion errors {sum(bool(r['error']) for r in rows)}"
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        print(f"{path.stem}: {len(rows)} questions, " + ", ".join(f"{k} {v}/{len(rows)}" for k, v in counts.items()) + f"{extra}, mean wall {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["agent", "plain", "structured", "dspy", "react", "report"])
    parser.add_argument("--method", choices=["greedy", "bon", "nabla"], default="greedy")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--resume", action="store_true", help="agent: keep the rows already in the file, run the rest")
    parser.add_argument("--plain-tool", action="store_true", help="agent: the calculator's argument is a bare str (no pattern)")
    parser.add_argument("--tool-use", choices=["call_then_answer", "model"], default="call_then_answer", help="agent: ChatNablaReasoner's tool_use")
    parser.add_argument("--response-format", action="store_true", help="agent: create_agent(..., response_format=Answer)")
    args = parser.parse_args()
    if args.task == "report":
        report()
        return
    if args.task == "agent":
        run_agent(args.method, args.limit, args.max_new_tokens, args.resume, args.plain_tool, args.tool_use, args.response_format)
        return
    {"agent": run_agent, "plain": run_plain, "structured": run_structured, "dspy": run_dspy, "react": run_react}[args.task](args.method, args.limit, args.max_new_tokens)


if __name__ == "__main__":
    main()
