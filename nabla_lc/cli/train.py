"""``nabla-lc train-reward`` (a LoRA reward from labeled responses) and ``nabla-lc train-default-reward``
(the embedded policy's default reward, by its recipe in :mod:`nabla_lc.bench.reward_recipe`)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .. import models
from ..bench.reward_recipe import DEFAULT_QUESTIONS, DEFAULT_SWAP_STEPS, TRAIN_LEVELS, recipe_records, swap_groups, training_problems
from ..bench.reward_recipe import __doc__ as RECIPE
from ..rewards.default import DEFAULT_MAX_NEW_TOKENS, DEFAULT_REWARD_FILE
from ..rewards.lora import DEFAULT_TARGETS, LoRAReward
from ..rewards.train import Record, TrainReport, read_records, split, train_reward

_TRAIN_REWARD = "Fit a LoRA reward on the policy's own backbone from labeled responses."


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-reward", help="train a LoRA reward on the policy's backbone", description=_TRAIN_REWARD)
    p.add_argument("--data", required=True, type=Path, help='JSONL of {"prompt", "response", "correct"} records')
    p.add_argument("--policy", default="embedded", help='policy checkpoint directory, GGUF file, or "embedded"')
    p.add_argument("--out", required=True, type=Path, help="safetensors file for the adapter and head")
    _add_training_flags(p, targets=",".join(DEFAULT_TARGETS), lr=1e-4, batch_help="pairs (bt) or records (bce) per step")
    p.add_argument("--objective", choices=("bt", "bce"), default="bt", help="Bradley-Terry pairs or per-record BCE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.set_defaults(func=run_train_reward)

    p = subparsers.add_parser(
        "train-default-reward",
        help="generate labeled arith samples from the embedded policy and train its default LoRA reward",
        description=RECIPE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS, help=f"training questions, split over levels {TRAIN_LEVELS}")
    p.add_argument("--samples", type=int, default=8, help="sampled responses per question")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the responses")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens per response")
    p.add_argument("--records", type=Path, default=None, help="JSONL of labeled responses: read if it exists, else written after generating")
    _add_training_flags(p, targets="q_proj,v_proj", lr=2e-4, batch_help="pairs per training step")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, the held-out split and training")
    p.add_argument("--swap-steps", type=int, default=DEFAULT_SWAP_STEPS, help="steps of the second phase, Bradley-Terry plus swap consistency (0: none)")
    p.add_argument("--swap-groups", type=int, default=80, help="one-token swap groups drawn from the training responses")
    p.add_argument("--swap-k", type=int, default=4, help="alternative tokens per swap group")
    p.add_argument("--swap-weight", type=float, default=1.0, help="weight of the swap-consistency term")
    p.add_argument("--swap-batch-size", type=int, default=4, help="Bradley-Terry pairs per step of the second phase")
    p.add_argument("--init", type=Path, default=None, help="start the second phase from this reward file instead of training the first")
    p.add_argument("--out", type=Path, default=DEFAULT_REWARD_FILE, help="safetensors file to write (default: the packaged file)")
    p.set_defaults(func=run_train_default_reward)


def _add_training_flags(p: argparse.ArgumentParser, targets: str, lr: float, batch_help: str) -> None:
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--target-modules", default=targets, help="comma-separated module names")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of pairable prompts held out for pairwise accuracy")


def train_from_args(
    args: argparse.Namespace, model: nn.Module, tokenizer: Any, records: Sequence[Record], objective: str, **extra: Any
) -> tuple[LoRAReward, TrainReport]:
    """Train with the shared flags (--rank, --target-modules, --epochs, --lr, --batch-size, --seed, --heldout); ``extra``
    goes to :func:`train_reward` as it is (and overrides a flag of the same name)."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    settings: dict[str, Any] = dict(
        rank=args.rank, target_modules=targets, objective=objective, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, heldout=args.heldout,
    )
    return train_reward(model, tokenizer, records, **{**settings, **extra})


def run_train_reward(args: argparse.Namespace) -> int:
    records = read_records(args.data)
    model, tokenizer = models.load_policy(args.policy, device=args.device)
    reward, report = train_from_args(args, model, tokenizer, records, args.objective)
    reward.save(args.out)
    print(json.dumps({"out": str(args.out), **asdict(report)}))
    return 0


def run_train_default_reward(args: argparse.Namespace) -> int:
    model, tokenizer = models.load_embedded()
    records, generate_s = recipe_records(
        model, tokenizer, args.records, args.questions, args.samples, args.temperature, args.max_new_tokens, args.seed
    )
    summary: dict[str, Any] = {
        "out": str(args.out),
        "records": len(records),
        "fraction_correct": round(sum(r.correct for r in records) / len(records), 4),
        "generate_s": generate_s,
    }
    start = time.perf_counter()
    if args.init is not None:
        reward = LoRAReward.load(args.init, model, tokenizer)
    else:
        reward, report = train_from_args(args, model, tokenizer, records, objective="bt")
        summary.update(train_s=round(time.perf_counter() - start, 1), **asdict(report))
    if args.swap_steps > 0:
        start = time.perf_counter()
        train, _ = split(records, args.heldout, args.seed)
        answers = {p.problem: p.final_answer for p in training_problems(args.questions)}
        groups = swap_groups(model, tokenizer, [r for r in train if r.prompt in answers], answers, args.swap_groups, args.swap_k, args.seed)
        reward, report = train_from_args(
            args, model, tokenizer, records, objective="bt", reward=reward, swaps=groups, swap_weight=args.swap_weight,
            max_steps=args.swap_steps, batch_size=args.swap_batch_size, epochs=max(args.epochs, 1),
        )
        summary["swap_phase"] = {"train_s": round(time.perf_counter() - start, 1), **asdict(report)}
    reward.save(args.out)
    print(json.dumps(summary))
    return 0
