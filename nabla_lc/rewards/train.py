"""``nabla-lc train-reward``: fit a LoRA reward on the policy's own backbone from labeled responses."""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .lora import DEFAULT_TARGETS, LoRAReward

log = logging.getLogger(__name__)

Objective = Literal["bt", "bce"]


@dataclass(frozen=True)
class Record:
    """One labeled response."""

    prompt: str
    response: str
    correct: bool


@dataclass(frozen=True)
class TrainReport:
    """What training did and how well the reward ranks held-out pairs."""

    objective: str
    steps: int
    final_loss: float
    train_records: int
    heldout_records: int
    heldout_pairs: int
    heldout_accuracy: float | None
    """Fraction of held-out (correct, incorrect) pairs of one prompt ranked correctly; None without pairs."""


def read_records(path: str | Path) -> list[Record]:
    """Records ``{"prompt", "response", "correct"}`` from a JSONL file (blank lines skipped)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"prompt", "response", "correct"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number} lacks {sorted(missing)}")
        if not isinstance(row["correct"], bool):
            raise ValueError(f"{path}:{number}: 'correct' must be true or false, got {row['correct']!r}")
        records.append(Record(str(row["prompt"]), str(row["response"]), row["correct"]))
    return records


def pairs(records: Sequence[Record]) -> list[tuple[Record, Record]]:
    """Every (correct, incorrect) pair of responses to the same prompt."""
    by_prompt: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_prompt[r.prompt].append(r)
    return [(c, i) for rs in by_prompt.values() for c in rs if c.correct for i in rs if not i.correct]


def split(records: Sequence[Record], heldout: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out a fraction of the prompts that have both a correct and an incorrect response."""
    labels: dict[str, set[bool]] = defaultdict(set)
    for r in records:
        labels[r.prompt].add(r.correct)
    pairable = sorted(p for p, seen in labels.items() if len(seen) == 2)
    random.Random(seed).shuffle(pairable)
    n = 0
    if heldout > 0 and len(pairable) >= 2:  # at least one prompt held out, at least one kept
        n = min(max(round(heldout * len(pairable)), 1), len(pairable) - 1)
    held = set(pairable[:n])
    return [r for r in records if r.prompt not in held], [r for r in records if r.prompt in held]


def train_reward(
    policy_model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    rank: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    objective: Objective = "bt",
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    heldout: float = 0.2,
    progress: bool = True,
) -> tuple[LoRAReward, TrainReport]:
    """Inject a LoRA reward into ``policy_model`` and fit it.

    ``bt``: Bradley-Terry, ``-log sigmoid(r(correct) - r(incorrect))`` over pairs to the same prompt;
    ``bce``: binary cross-entropy of ``sigmoid(r)`` against the label.
    """
    if objective not in ("bt", "bce"):
        raise ValueError(f"objective must be 'bt' or 'bce', got {objective!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    torch.manual_seed(seed)
    train, held = split(records, heldout, seed)
    items: list[Any] = pairs(train) if objective == "bt" else list(train)
    if not items:
        raise ValueError(f"no training {'pairs' if objective == 'bt' else 'records'} (records: {len(records)})")
    reward = LoRAReward(policy_model, tokenizer, rank=rank, target_modules=target_modules)
    reward.trainable(True)
    params = [*reward.adapter_parameters(), *reward.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    order = random.Random(seed)
    steps_per_epoch = (len(items) + batch_size - 1) // batch_size
    loss_value = float("nan")
    with tqdm(total=epochs * steps_per_epoch, desc="train-reward", disable=not progress) as bar:
        for _ in range(epochs):
            order.shuffle(items)
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                with reward.adapter():  # why: keep the adapter on through backward
                    loss = _loss(reward, tokenizer, batch, objective)
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
    reward.trainable(False)
    accuracy, n_pairs = heldout_accuracy(reward, tokenizer, held, batch_size)
    report = TrainReport(objective, epochs * steps_per_epoch, loss_value, len(train), len(held), n_pairs, accuracy)
    log.info("trained the LoRA reward: %s", report)
    return reward, report


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _loss(reward: LoRAReward, tokenizer: Any, batch: Sequence[Any], objective: Objective) -> torch.Tensor:
    if objective == "bt":
        flat = [r for pair in batch for r in pair]  # correct, incorrect, correct, ...
        values, _ = reward.values([r.prompt for r in flat], [_ids(tokenizer, r.response) for r in flat])
        return -F.logsigmoid(values[0::2] - values[1::2]).mean()
    values, _ = reward.values([r.prompt for r in batch], [_ids(tokenizer, r.response) for r in batch])
    labels = torch.tensor([float(r.correct) for r in batch], device=values.device)
    return F.binary_cross_entropy_with_logits(values, labels)


def heldout_accuracy(reward: LoRAReward, tokenizer: Any, records: Sequence[Record], batch_size: int = 8) -> tuple[float | None, int]:
    """Pairwise accuracy on ``records`` (ties count as wrong) and the number of pairs."""
    held_pairs = pairs(records)
    if not held_pairs:
        log.warning("no held-out pairs: accuracy is not measured")
        return None, 0
    scores: dict[int, float] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        values = reward.score([r.prompt for r in chunk], [_ids(tokenizer, r.response) for r in chunk]).values
        scores.update({id(r): float(v) for r, v in zip(chunk, values)})
    right = sum(scores[id(c)] > scores[id(i)] for c, i in held_pairs)
    return right / len(held_pairs), len(held_pairs)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-reward",
        help="train a LoRA reward on the policy's backbone",
        description=__doc__,
    )
    p.add_argument("--data", required=True, type=Path, help='JSONL of {"prompt", "response", "correct"} records')
    p.add_argument("--policy", default="embedded", help='policy checkpoint directory, GGUF file, or "embedded"')
    p.add_argument("--out", required=True, type=Path, help="safetensors file for the adapter and head")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    p.add_argument("--objective", choices=("bt", "bce"), default="bt", help="Bradley-Terry pairs or per-record BCE")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8, help="pairs (bt) or records (bce) per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out for pairwise accuracy")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.set_defaults(func=run)


def train_from_args(args: argparse.Namespace, model: nn.Module, tokenizer: Any, records: Sequence[Record], objective: str) -> TrainReport:
    """Train with the shared flags (--rank, --target-modules, --epochs, --lr, --batch-size, --seed, --heldout) and save to --out."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    reward, report = train_reward(
        model,
        tokenizer,
        records,
        rank=args.rank,
        target_modules=targets,
        objective=objective,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        heldout=args.heldout,
    )
    reward.save(args.out)
    return report


def run(args: argparse.Namespace) -> int:
    from ..models import load_policy  # why: imported on use, so the CLI starts without loading model code

    records = read_records(args.data)
    model, tokenizer = load_policy(args.policy, device=args.device)
    report = train_from_args(args, model, tokenizer, records, args.objective)
    print(json.dumps({"out": str(args.out), **asdict(report)}))
    return 0
