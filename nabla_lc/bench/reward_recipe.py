"""The recipe of the embedded policy's default reward (:mod:`nabla_lc.rewards.default`); the command is ``nabla-lc train-default-reward``.

Recipe (``nabla-lc train-default-reward``): the embedded SmolLM2-135M-Instruct answers ``arith`` training
questions, several sampled responses each (half prompted as ``nabla-lc bench`` prompts it, with the
step-by-step instruction as system message, half as a plain chat with no system message); every response
is labeled correct or not by ``arith.check`` against the reference answer; ``train_reward`` fits a LoRA
reward on the policy's own backbone with the Bradley-Terry objective and reports its pairwise accuracy on
held-out questions; the adapter and head are written to :data:`~nabla_lc.rewards.default.DEFAULT_REWARD_FILE`. The reward itself never
sees a reference answer: only the question and the response.

Training questions come from the ``dev`` half of ``arith`` (the ``test`` half is never touched), drawn with
:data:`TRAIN_SEED` at the levels :data:`TRAIN_LEVELS`, minus the first :data:`RESERVED_DEV` dev questions of
each of those levels at the split's base seed: when the shipped file was trained, ``arith``'s default level
was 2 and those were the questions ``nabla-lc bench --data arith:dev`` runs by default, kept out of training
so that dev measurements of the reward stay honest (``docs/default-reward.md`` says how far that still holds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..config import NablaConfig
from ..engine.policy import Policy
from ..facade import Engine
from ..rewards.default import DEFAULT_MAX_NEW_TOKENS
from ..rewards.train import Record, SwapGroup, read_records
from . import arith
from .grading import MATH_INSTRUCTION

log = logging.getLogger(__name__)

TRAIN_SEED = 3000
"""Seed of the training questions (the dev split's base seed is 1000, the test split's 2000)."""
TRAIN_LEVELS: tuple[int, ...] = (2,)
"""``arith`` levels of the training questions, split evenly between them (2: the benchmark's level when trained;
fixed here so that the recipe keeps reproducing the shipped file)."""
TRAIN_SYSTEMS: tuple[str | None, ...] = (MATH_INSTRUCTION, None)
"""System messages the samples are prompted with, half each: the benchmark's instruction, and none (chat)."""
RESERVED_DEV = 100
"""The first this many dev questions (base seed) of each training level never train (``nabla-lc bench``'s default count)."""
DEFAULT_QUESTIONS = 120
"""Training questions of the shipped recipe: every unreserved level-2 dev question."""
DEFAULT_SWAP_STEPS = 0
"""Steps of the optional second phase (Bradley-Terry plus swap consistency, one swap group a step). 0: the shipped
file has none; 80 steps were measured and not shipped (``docs/default-reward.md``)."""


def training_problems(count: int, seed: int = TRAIN_SEED, levels: Sequence[int] = TRAIN_LEVELS) -> list[arith.Problem]:
    """``count`` distinct dev questions, as evenly as possible over ``levels``, none of them reserved.

    Raises ValueError when a level holds fewer unreserved dev questions than its share.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not levels:
        raise ValueError("levels must not be empty")
    problems: list[arith.Problem] = []
    for k, level in enumerate(levels):
        share = count // len(levels) + (k < count % len(levels))
        reserved = {p.problem for p in arith.make_problems("dev", RESERVED_DEV, level=level)}
        drawn = arith.make_problems("dev", share + RESERVED_DEV, level=level, seed=seed)  # why: at most RESERVED_DEV are dropped
        kept = list({p.problem: p for p in drawn if p.problem not in reserved}.values())[:share]
        if len(kept) < share:
            raise ValueError(f"arith level {level} holds only {len(kept)} unreserved dev questions; asked for {share}")
        problems.extend(kept)
    return problems


def generate_records(
    model: nn.Module,
    tokenizer: Any,
    problems: Sequence[arith.Problem],
    samples: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int = 4,
    systems: Sequence[str | None] = TRAIN_SYSTEMS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The policy's own sampled responses to ``problems``, labeled by ``arith.check``.

    Returns ``samples`` records ``{"prompt", "response", "correct"}`` per problem, in order; ``prompt`` is the
    question as the user wrote it, which is all a reward sees. The samples of a problem are split evenly over
    ``systems``, the system messages the policy is prompted with (``None``: none); ``samples`` must be a
    multiple of their number. ``batch_size`` questions are decoded together.
    """
    if samples < 1 or batch_size < 1:
        raise ValueError("samples and batch_size must be >= 1")
    if not systems or samples % len(systems):
        raise ValueError(f"samples ({samples}) must be a positive multiple of the number of systems ({len(systems)})")
    engine = Engine(model, tokenizer)
    per_system = samples // len(systems)
    config = NablaConfig(method="sc", n=per_system, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
    records: list[dict[str, Any]] = []
    with tqdm(total=len(problems), desc="generate", unit="question", disable=not progress) as bar:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            requests = [engine.request(p.problem, system=system) for p in chunk for system in systems]
            results = engine.generate(requests, config, extract_answer=arith.extract_answer)
            for k, problem in enumerate(chunk):
                for result in results[k * len(systems) : (k + 1) * len(systems)]:
                    texts = [s["text"] for s in result.samples] if per_system > 1 else [result.text]
                    records.extend(
                        {"prompt": problem.problem, "response": t, "correct": arith.check(arith.extract_answer(t), problem.final_answer)}
                        for t in texts
                    )
            bar.update(len(chunk))
    return records


@torch.no_grad()
def swap_groups(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    answers: dict[str, str],
    count: int,
    k: int = 4,
    seed: int = 0,
    min_entropy: float = 0.25,
    progress: bool = True,
) -> list[SwapGroup]:
    """One-token swaps of the policy's own responses, labeled by ``arith.check``: up to ``count`` groups.

    For each of ``count`` records drawn with ``seed``: a position where the policy's next-token entropy (plain chat
    prompt) exceeds ``min_entropy``, as the positions ∇ probes, and the policy's ``k`` most likely other tokens
    there. ``answers`` maps each record's prompt to its reference answer (used by the checker only).
    """
    policy = Policy(model, tokenizer)
    rng = random.Random(seed)
    groups: list[SwapGroup] = []
    for record in tqdm(rng.sample(list(records), min(count, len(records))), desc="swaps", unit="response", disable=not progress):
        response = list(tokenizer(record.response, add_special_tokens=False)["input_ids"])
        prompt = policy.template(record.prompt)
        if not response:
            continue
        logits = model(input_ids=torch.tensor([prompt + response], device=policy.device)).logits[0, len(prompt) - 1 : -1].float()
        logp = logits.log_softmax(-1)  # [n, V] the distribution each response token was drawn from
        uncertain = [t for t, h in enumerate((-(logp.exp() * logp).sum(-1)).tolist()) if h > min_entropy]
        if not uncertain:
            continue
        t = rng.choice(uncertain)
        alternatives = [j for j in logits[t].topk(k + 1).indices.tolist() if j != response[t]][:k]
        group = SwapGroup(record.prompt, tuple(response), t, tuple(alternatives), record.correct, ())
        labels = tuple(arith.check(arith.extract_answer(tokenizer.decode(group.swapped(j))), answers[record.prompt]) for j in alternatives)
        groups.append(dataclasses.replace(group, swapped_correct=labels))
    return groups


def recipe_records(
    model: nn.Module,
    tokenizer: Any,
    records_path: Path | None,
    questions: int = DEFAULT_QUESTIONS,
    samples: int = 8,
    temperature: float = 0.7,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
) -> tuple[list[Record], float | None]:
    """The labeled responses (read from ``records_path`` when it exists, else generated and written there when
    it is given) and the seconds spent generating them (None when read)."""
    if records_path is not None and records_path.is_file():
        log.info("reading the labeled responses from %s", records_path)
        return read_records(records_path), None
    start = time.perf_counter()
    problems = training_problems(questions)
    rows = generate_records(model, tokenizer, problems, samples, temperature, max_new_tokens, seed)
    if records_path is not None:
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [Record(r["prompt"], r["response"], r["correct"]) for r in rows], round(time.perf_counter() - start, 1)
