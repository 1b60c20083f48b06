"""The bench's arith questions as a local lm-eval task, and lm-eval's ``local-completions`` and
``local-chat-completions`` run on it against an OpenAI-compatible server (``nabla-lc serve``).

The task is written to a directory (questions as JSONL, a task YAML, and a ``process_results`` that grades with the
bench's own :func:`nabla_lc.bench.arith.extract_answer` and :func:`~nabla_lc.bench.arith.check`), so lm-eval needs no
dataset download. Two tasks read the same questions:

- ``nabla_arith_chat`` sends the question as the user message under the bench's system message (lm-eval's
  ``local-chat-completions``; the server applies the chat template), as the bench prompts;
- ``nabla_arith_text`` sends a text prompt to ``/v1/completions`` (``local-completions``): by default the question
  itself; ``docs/lmeval_arith.py`` passes the bench's chat prompt rendered to text by :func:`rendered_prompts`, so
  the server decodes the same tokens as the bench.

Needs lm-eval (``pip install lm-eval==0.4.13``, in the ``test`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

from .arith import Problem
from .grading import MATH_INSTRUCTION
from .runner import BenchProblem

Mode = Literal["chat", "text"]

TASKS: dict[Mode, str] = {"chat": "nabla_arith_chat", "text": "nabla_arith_text"}
"""The task of each mode."""
MODELS: dict[Mode, str] = {"chat": "local-chat-completions", "text": "local-completions"}
"""lm-eval's model type of each mode."""
ENDPOINTS: dict[Mode, str] = {"chat": "/chat/completions", "text": "/completions"}
"""The endpoint (under the server's ``/v1``) each model type posts to."""
METRIC = "acc,none"
"""The accuracy in lm-eval's results (``process_results``' ``acc``, no filter)."""

_UTILS = '''"""process_results of the nabla_arith tasks: the bench's own answer extraction and exact integer check."""

from nabla_lc.bench.arith import check, extract_answer


def process_results(doc, results):
    return {"acc": float(check(extract_answer(results[0]), doc["final_answer"]))}
'''


def write_task(directory: Path, problems: Sequence[Problem | BenchProblem], prompts: Sequence[str] | None = None, max_gen_toks: int = 256) -> Path:
    """Write the two tasks over ``problems`` into ``directory`` (lm-eval's ``include_path``) and return it.

    ``prompts`` are the text prompts of ``nabla_arith_text`` (default: the questions themselves). Decoding stops only
    at the model's end of sequence or after ``max_gen_toks`` tokens, as the bench's does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    texts = list(prompts) if prompts is not None else [p.problem for p in problems]
    if len(texts) != len(problems):
        raise ValueError(f"{len(texts)} prompts for {len(problems)} problems")
    data = directory / "arith.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for problem, text in zip(problems, texts):
            f.write(json.dumps({"id": problem.id, "problem": problem.problem, "prompt": text, "final_answer": problem.final_answer}) + "\n")
    (directory / "nabla_arith_utils.py").write_text(_UTILS, encoding="utf-8")
    for mode, field in (("chat", "problem"), ("text", "prompt")):
        task = TASKS[mode]  # type: ignore[index]
        yaml = f"""task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: generate_until
doc_to_text: {field}
doc_to_target: final_answer
process_results: !function nabla_arith_utils.process_results
generation_kwargs:
  until: []
  max_gen_toks: {int(max_gen_toks)}
  do_sample: false
  temperature: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
        (directory / f"{task}.yaml").write_text(yaml, encoding="utf-8")
    return directory


def rendered_prompts(tokenizer: Any, problems: Sequence[Problem | BenchProblem], system: str | None = MATH_INSTRUCTION) -> list[str]:
    """The bench's chat prompt of each problem as text (``tokenizer``'s chat template with the assistant's turn
    opened): sent to ``/v1/completions``, it is the token sequence the bench decodes from."""
    head = [{"role": "system", "content": system}] if system else []
    return [tokenizer.apply_chat_template([*head, {"role": "user", "content": p.problem}], tokenize=False, add_generation_prompt=True) for p in problems]


def evaluate(mode: Mode, base_url: str, model: str, api_key: str, task_dir: Path, *, batch_size: int = 4, num_concurrent: int = 1) -> dict[str, Any]:
    """lm-eval's results of the ``mode`` task in ``task_dir`` against the server at ``base_url`` (``.../v1``), served
    as ``model``: ``{"acc": accuracy, "n": questions, "samples": [...]}``. Text prompts are sent as text
    (``tokenized_requests=False``: the server refuses token ids); ``batch_size`` prompts per completions request."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {
        "model": model, "base_url": base_url + ENDPOINTS[mode], "tokenizer_backend": None, "tokenized_requests": False,
        "num_concurrent": num_concurrent, "max_retries": 1, "batch_size": batch_size if mode == "text" else 1,
        "header": {"Authorization": f"Bearer {api_key}"},
    }  # fmt: skip
    task = TASKS[mode]
    results = lm_eval.simple_evaluate(
        model=MODELS[mode], model_args=args, tasks=[task], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=mode == "chat", system_instruction=MATH_INSTRUCTION if mode == "chat" else None, log_samples=True,
    )
    samples = results["samples"][task]
    return {"acc": results["results"][task][METRIC], "n": len(samples), "samples": samples}
