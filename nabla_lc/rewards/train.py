"""Fitting a LoRA reward on the policy's own backbone from labeled responses (``nabla-lc train-reward``)."""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from .base import RewardAdapter
from .base import rank as reward_rank
from .implicit import ImplicitLoRAReward
from .lora import DEFAULT_TARGETS, LoRAReward

log = logging.getLogger(__name__)

Objective = Literal["bt", "bce"]
HeadKind = Literal["scalar", "implicit"]


@dataclass(frozen=True)
class Record:
    """One labeled response."""

    prompt: str
    response: str
    correct: bool


@dataclass(frozen=True)
class SwapGroup:
    """A response and one-token swaps of it at one position (the rest fixed), each labeled by the checker."""

    prompt: str
    response: tuple[int, ...]
    """Policy token ids of the response."""
    position: int
    """Index of the swapped token in ``response``."""
    alternatives: tuple[int, ...]
    """Tokens put in its place, one swap each."""
    correct: bool
    swapped_correct: tuple[bool, ...]
    """The checker's label of each swapped response."""

    def swapped(self, j: int) -> list[int]:
        """The response with its token at :attr:`position` replaced by ``j``."""
        return [*self.response[: self.position], j, *self.response[self.position + 1 :]]


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
    swap_groups: int = 0
    """Swap groups the swap-consistency term trained on."""
    final_swap_loss: float | None = None


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
    swaps: Sequence[SwapGroup] = (),
    swap_weight: float = 1.0,
    reward: LoRAReward | None = None,
    max_steps: int | None = None,
    head: HeadKind = "scalar",
) -> tuple[LoRAReward, TrainReport]:
    """Inject a LoRA reward into ``policy_model`` (or continue training ``reward``, already injected) and fit it.

    ``bt``: Bradley-Terry, ``-log sigmoid(r(correct) - r(incorrect))`` over pairs to the same prompt;
    ``bce``: binary cross-entropy of ``sigmoid(r)`` against the label. With ``swaps``, each step also adds
    ``swap_weight`` × :func:`swap_loss` of one swap group (taken in turn), so that the reward's input gradient
    predicts what one-token swaps do to it, the quantity DTO relies on. ``max_steps`` stops training early.
    ``head``: a new reward's kind, ``scalar`` (:class:`LoRAReward`) or ``implicit`` (:class:`ImplicitLoRAReward`,
    Bradley-Terry on its log-probability ratio is DPO's objective).
    """
    if objective not in ("bt", "bce"):
        raise ValueError(f"objective must be 'bt' or 'bce', got {objective!r}")
    if head not in ("scalar", "implicit"):
        raise ValueError(f"head must be 'scalar' or 'implicit', got {head!r}")
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("epochs, batch_size and max_steps must be >= 1")
    torch.manual_seed(seed)
    train, held = split(records, heldout, seed)
    items: list[Any] = pairs(train) if objective == "bt" else list(train)
    if not items:
        raise ValueError(f"no training {'pairs' if objective == 'bt' else 'records'} (records: {len(records)})")
    if reward is None:
        kind = {"scalar": LoRAReward, "implicit": ImplicitLoRAReward}[head]
        reward = kind(policy_model, tokenizer, rank=rank, target_modules=target_modules)

    def batch_loss(batch: Sequence[Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss = _loss(reward, tokenizer, batch, objective)
        if not swaps:
            return loss, {}
        swap = swap_loss(reward, swaps[step % len(swaps)])
        return loss + swap_weight * swap, {"swap": float(swap.detach())}

    step, loss_value, last = _fit(
        reward, items, batch_loss, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, max_steps=max_steps,
        desc="train-reward", progress=progress,
    )
    swap_value = last.get("swap")
    accuracy, n_pairs = heldout_accuracy(reward, tokenizer, held, batch_size)
    report = TrainReport(
        objective, step, loss_value, len(train), len(held), n_pairs, accuracy, min(len(swaps), step), swap_value
    )
    log.info("trained the LoRA reward: %s", report)
    return reward, report


def _fit(
    reward: LoRAReward,
    items: list[Any],
    batch_loss: Callable[[Sequence[Any], int], tuple[torch.Tensor, dict[str, float]]],
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    max_steps: int | None,
    desc: str,
    progress: bool,
) -> tuple[int, float, dict[str, float]]:
    """AdamW on the reward's trainable parameters over ``epochs`` shuffled passes of ``items`` in batches (at most
    ``max_steps``); ``batch_loss(batch, step)`` gives the loss and values to show. Returns (steps, the last loss,
    the last values)."""
    reward.trainable(True)
    optimizer = torch.optim.AdamW(reward.trainable_parameters(), lr=lr)
    order = random.Random(seed)
    total = epochs * ((len(items) + batch_size - 1) // batch_size)
    total = min(total, max_steps) if max_steps is not None else total
    loss_value, shown, step = float("nan"), {}, 0
    with tqdm(total=total, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            order.shuffle(items)
            for start in range(0, len(items), batch_size):
                if step == total:
                    break
                with reward.adapter():  # why: keep the adapter on through backward
                    loss, shown = batch_loss(items[start : start + batch_size], step)
                    optimizer.zero_grad()
                    loss.backward()
                optimizer.step()
                step += 1
                loss_value = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", **{k: f"{v:.4f}" for k, v in shown.items()})
    reward.trainable(False)
    return step, loss_value, shown


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


def swap_loss(reward: LoRAReward, group: SwapGroup) -> torch.Tensor:
    """How far the reward's first-order prediction of each swap misses its actual change, plus the checker's word.

    The first term is the mean squared miss of :func:`swap_changes`, divided by the mean squared actual change
    (scale-free; the actual change is a fixed target, so the gradient is fitted to the reward, not the reverse).
    The second is Bradley-Terry on every swap that flips the checker's label, so the changes that matter are large.
    Differentiates through the input gradient (a second-order pass).
    """
    predicted, r0, r1 = swap_changes(reward, group)
    actual = (r1 - r0).detach()
    miss = ((predicted - actual) ** 2).mean() / ((actual**2).mean() + 1e-4)
    flips = [(n, c) for n, c in enumerate(group.swapped_correct) if c != group.correct]
    if not flips:
        return miss
    margins = torch.stack([(r1[n] - r0) if c else (r0 - r1[n]) for n, c in flips])
    return miss - F.logsigmoid(margins).mean()


def swap_changes(reward: LoRAReward, group: SwapGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted [k], r(response), r(swapped) [k]), all differentiable in the reward's parameters, fp32.

    predicted_j = ∂r/∂e_t · (E[j] − E[y_t]) through the input embedding e_t of the swapped position: the swap
    test's g·(e_j − e_y).
    """
    with sdpa_kernel(SDPBackend.MATH):  # why: the fused CPU attention kernels have no second derivative
        response = list(group.response)
        lay = reward.layout(group.prompt, response)
        ids = torch.tensor(response, dtype=torch.long, device=reward.embedding.device)
        vecs = reward.vocab.embed_ids(ids, reward.embedding).detach().requires_grad_(True)  # [n, H]
        hidden = reward.forward_hidden(reward.embeds(lay.ids, lay.source, vecs)[None])
        r0 = reward.combine(reward.read(hidden[0, lay.reads])).float()
        (grad,) = torch.autograd.grad(r0, vecs, create_graph=True)  # [n, H]
        alternatives = torch.tensor(list(group.alternatives), dtype=torch.long, device=ids.device)
        delta = reward.vocab.embed_ids(alternatives, reward.embedding) - vecs[group.position].detach()  # [k, H]
        predicted = (delta.to(grad.dtype) @ grad[group.position]).float()
        r1, _ = reward.values([group.prompt] * len(group.alternatives), [group.swapped(j) for j in group.alternatives])
    return predicted, r0, r1.float()


def heldout_accuracy(reward: LoRAReward, tokenizer: Any, records: Sequence[Record], batch_size: int = 8) -> tuple[float | None, int]:
    """Pairwise accuracy on ``records`` (ties count as wrong) and the number of pairs."""
    if not pairs(records):
        log.warning("no held-out pairs: accuracy is not measured")
        return None, 0
    return pairwise_accuracy(records, _scores(reward, tokenizer, records, batch_size))


def pairwise_accuracy(records: Sequence[Record], rewards: Sequence[float]) -> tuple[float | None, int]:
    """The fraction of (correct, incorrect) pairs of one prompt whose rewards rank them right (ties count as wrong)."""
    scores = {id(r): v for r, v in zip(records, rewards)}
    held_pairs = pairs(records)
    if not held_pairs:
        return None, 0
    return sum(scores[id(c)] > scores[id(i)] for c, i in held_pairs) / len(held_pairs), len(held_pairs)


def _scores(reward: RewardAdapter, tokenizer: Any, records: Sequence[Record], batch_size: int) -> list[float]:
    values: list[float] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        values += [float(v) for v in reward.score([r.prompt for r in chunk], [_ids(tokenizer, r.response) for r in chunk]).values]
    return values


@dataclass(frozen=True)
class ProcessReport:
    """What process-reward training did, and how its step scores and its Best-of-N pick do on held-out questions."""

    steps: int
    final_loss: float
    train_records: int
    heldout_records: int
    heldout_steps: int
    """Steps (reads) in the held-out responses."""
    step_positive_fraction: float | None
    """Fraction of held-out steps whose label is positive (the accuracy of always answering "incorrect" is 1 minus it)."""
    step_accuracy: float | None
    """Held-out steps whose P(correct) > 0.5 agrees with the label (the final answer's correctness, propagated)."""
    step_balanced_accuracy: float | None
    """The mean of the step accuracies on positive and on negative steps."""
    heldout_pairs: int
    heldout_accuracy: float | None
    """Fraction of held-out (correct, incorrect) pairs of one prompt ranked correctly by the aggregated reward."""
    heldout_questions: int
    heldout_mean_accuracy: float | None
    """The mean correctness of a held-out question's responses (a random pick among its samples)."""
    heldout_best_of_n: float | None
    """The correctness of the highest-reward response of each held-out question (Best-of-N over its samples)."""


def train_process_reward(
    policy_model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    step_separator: str = "\n\n",
    aggregation: str = "last",
    rank: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    epochs: int = 1,
    lr: float = 2e-4,
    batch_size: int = 8,
    seed: int = 0,
    heldout: float = 0.2,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[LoRAReward, ProcessReport]:
    """Inject a LoRA process reward into ``policy_model`` and fit its step reads by binary cross-entropy.

    Every step of a response is labeled with the response's own correctness (final correctness propagated: the
    step score estimates P(correct | the response so far)). A response's loss is the mean over its steps, so long
    responses do not outweigh short ones. Held-out prompts are those :func:`split` holds out.
    """
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("epochs, batch_size and max_steps must be >= 1")
    torch.manual_seed(seed)
    train, held = split(records, heldout, seed)
    if not train:
        raise ValueError(f"no training records (records: {len(records)})")
    reward = LoRAReward(policy_model, tokenizer, rank=rank, target_modules=target_modules, step_separator=step_separator, aggregation=aggregation)  # type: ignore[arg-type]

    def batch_loss(batch: Sequence[Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        reads = reward.reads([r.prompt for r in batch], [_ids(tokenizer, r.response) for r in batch])
        losses = [F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(r.correct))) for logits, r in zip(reads, batch)]
        return torch.stack(losses).mean(), {}

    step, loss_value, _ = _fit(
        reward, list(train), batch_loss, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, max_steps=max_steps,
        desc="train-process-reward", progress=progress,
    )
    reads = _held_out_reads(reward, tokenizer, held, batch_size)
    labels = [r.correct for r, logits in zip(held, reads) for _ in logits]
    predicted = [v > 0 for logits in reads for v in logits.tolist()]
    rewards = [float(reward.combine(logits)) for logits in reads]
    accuracy, pairs_count = pairwise_accuracy(held, rewards)
    bon, mean, questions = best_of(held, rewards)
    report = ProcessReport(
        step, loss_value, len(train), len(held), len(labels),
        _mean([float(y) for y in labels]), _mean([float(p == y) for p, y in zip(predicted, labels)]),
        _balanced(labels, predicted), pairs_count, accuracy, questions, mean, bon,
    )  # fmt: skip
    log.info("trained the LoRA process reward: %s", report)
    return reward, report


@torch.no_grad()
def _held_out_reads(reward: LoRAReward, tokenizer: Any, records: Sequence[Record], batch_size: int) -> list[torch.Tensor]:
    """Every record's step logits, in one scoring pass (step accuracy, pairs and Best-of-N all read them)."""
    reads: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        with reward.adapter():
            reads += reward.reads([r.prompt for r in chunk], [_ids(tokenizer, r.response) for r in chunk])
    return reads


def best_of_n(reward: RewardAdapter, tokenizer: Any, records: Sequence[Record], batch_size: int = 8) -> tuple[float | None, float | None, int]:
    """:func:`best_of` with ``reward``'s scores of ``records``."""
    return best_of(records, _scores(reward, tokenizer, records, batch_size))


def best_of(records: Sequence[Record], rewards: Sequence[float]) -> tuple[float | None, float | None, int]:
    """On the prompts of ``records`` (each with its sampled responses): the accuracy of the highest-reward response
    (the first on ties), the mean accuracy of a response (a random pick), and the number of prompts."""
    by_prompt: dict[str, list[tuple[Record, float]]] = defaultdict(list)
    for r, v in zip(records, rewards):
        by_prompt[r.prompt].append((r, v))
    picked = [float(max(group, key=lambda rv: reward_rank(rv[1]))[0].correct) for group in by_prompt.values()]
    mean = [sum(r.correct for r, _ in group) / len(group) for group in by_prompt.values()]
    return _mean(picked), _mean(mean), len(by_prompt)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _balanced(labels: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    per_class = [_mean([float(p == y) for p, y in zip(predicted, labels) if y == cls]) for cls in (True, False)]
    known = [a for a in per_class if a is not None]
    return sum(known) / len(known) if known else None
