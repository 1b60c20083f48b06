"""Measure greedy accuracy and pass@8 of the embedded SmolLM2-135M-Instruct on ``arith`` dev questions.

Usage: ``python docs/arith_calibrate.py --levels 2 3 --count 48 --system math`` (see docs/arith.md). Plain
transformers ``generate`` with the chat template and left padding; prints one JSON line per level.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nabla_lc.bench.arith import check, extract_answer, make_problems
from nabla_lc.bench.grading import MATH_INSTRUCTION
from nabla_lc.models import load_embedded


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    system: str | None,
    sample: bool,
    n: int,
    max_new_tokens: int,
) -> list[list[str]]:
    """``n`` responses per question: greedy (n must be 1) or sampled at temperature 0.7, top-p 1.0."""
    head = [{"role": "system", "content": system}] if system else []
    prompts = [
        tokenizer.apply_chat_template(head + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(questions))]


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    level: int,
    count: int,
    system: str | None,
    batch: int,
    max_new_tokens: int,
) -> dict[str, int | float | str | None]:
    """Greedy, pass@8 and majority@8 counts on the first ``count`` dev questions of ``level``."""
    problems = make_problems("dev", count, level=level)
    greedy = pass8 = maj8 = 0
    start = time.perf_counter()
    torch.manual_seed(0)
    for i in tqdm(range(0, count, batch), desc=f"level {level}"):
        chunk = problems[i : i + batch]
        questions = [p.problem for p in chunk]
        greedy_texts = generate(model, tokenizer, questions, system, False, 1, max_new_tokens)
        sampled_texts = generate(model, tokenizer, questions, system, True, 8, max_new_tokens)
        for p, g, samples in zip(chunk, greedy_texts, sampled_texts):
            greedy += check(extract_answer(g[0]), p.final_answer)
            answers = [extract_answer(s) for s in samples]
            pass8 += any(check(a, p.final_answer) for a in answers)
            votes = [a for a in answers if a is not None]
            maj8 += bool(votes) and check(max(set(votes), key=votes.count), p.final_answer)
    return {
        "level": level,
        "count": count,
        "system": system,
        "greedy": greedy,
        "pass@8": pass8,
        "maj@8": maj8,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--system",
        choices=["none", "math"],
        default="none",
        help="system message: none (SmolLM2's default) or math (the benchmark runner's MATH_INSTRUCTION)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_embedded(device="cpu")
    tokenizer.padding_side = "left"
    system = MATH_INSTRUCTION if args.system == "math" else None
    for level in args.levels:
        result = measure(model, tokenizer, level, args.count, system, args.batch, args.max_new_tokens)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
