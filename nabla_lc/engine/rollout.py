"""Batched autoregressive sampling from existing prefixes, with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Sequence, TypeVar

import torch
from transformers import DynamicCache

from .accounting import Stats
from .constraints import Grammar, masked
from .policy import Policy
from .stream import cut_at_stop


@dataclass
class Sampling:
    """How to draw a token from logits."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """One sampled continuation of a prefix."""

    tokens: list[int]
    """Sampled tokens, without the end-of-sequence token."""
    logits: torch.Tensor | None
    """[L, V] fp32 raw policy logits that produced each token (None unless asked for)."""
    finish_reason: str
    """``eos``, ``stop`` (a stop string appeared), ``length``, or ``cancelled`` (``keep_going`` said no)."""
    allowed: torch.Tensor | None = None
    """[L, V] bool: the grammar's mask at each sampled position (None without a constraint or without logits)."""

    def drop(self, k: int) -> "Rollout":
        """The rollout without its first k tokens (their logits and masks too)."""
        assert self.logits is not None
        allowed = self.allowed[k:] if self.allowed is not None else None
        return Rollout(self.tokens[k:], self.logits[k:], self.finish_reason, allowed)


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and the top-p nucleus. logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row. logits: [B, V] -> [B]. Each row draws from its own generator."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / sampling.temperature, sampling.top_p, sampling.top_k).softmax(-1)
    out = [torch.multinomial(probs[b].cpu(), 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(out).to(logits.device)


def differ_chance(logits: torch.Tensor, token: int, sampling: Sampling) -> float:
    """The chance that a draw from ``logits`` ([V]) under ``sampling`` is not ``token``."""
    if sampling.temperature == 0:
        return float(int(logits.argmax()) != token)
    probs = filter_logits(logits.float()[None] / sampling.temperature, sampling.top_p, sampling.top_k).softmax(-1)
    return 1.0 - float(probs[0, token])


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[b, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class RolloutRow:
    """One continuation to sample: a row of a batched :func:`rollout` call."""

    prefix: list[int]
    """Prompt + committed response tokens."""
    committed: list[int]
    """The committed response tokens, so stop strings that straddle them are found."""
    budget: int
    """Most tokens to sample."""
    stop: Sequence[str]
    generator: torch.Generator | None
    """The row's own generator (None: the global one)."""
    stats: Stats
    """Where the row's policy passes are counted."""
    grammar: Grammar | None = None
    """The constraint's parse state after ``committed`` (None: free text); the rollout samples under its mask
    and advances it in place, so pass a fork (:meth:`~nabla_lc.engine.constraints.Grammar.fork`)."""


@torch.no_grad()
def rollout(
    policy: Policy,
    rows: Sequence[RolloutRow],
    sampling: Sampling,
    keep_logits: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    keep_going: Callable[[int], bool] | None = None,
) -> list[Rollout]:
    """Sample one continuation per row, all in one batch.

    Finished rows leave the batch (their KV rows are dropped), so every counted pass is real work.
    ``on_token(row, token)`` sees each kept token as it is sampled. A row with a grammar samples under its
    mask (the kept logits stay the policy's own; the masks are kept beside them). A row for which ``keep_going(row)``
    is false before a step leaves the batch at once, its rollout ending ``cancelled``.
    """
    B = len(rows)
    results: list[Rollout | None] = [None] * B
    tokens: list[list[int]] = [[] for _ in range(B)]
    kept: list[list[torch.Tensor]] = [[] for _ in range(B)]
    kept_allowed: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for b in range(B):
        if rows[b].budget <= 0:
            masks = torch.empty(0, policy.vocab_size, dtype=torch.bool) if keep_logits and rows[b].grammar is not None else None
            results[b] = Rollout([], torch.empty(0, policy.vocab_size) if keep_logits else None, "length", masks)
    active = [b for b in range(B) if results[b] is None]
    if not active:
        return [r for r in results if r is not None]

    ids, mask = _left_pad([rows[b].prefix for b in active], policy.pad_id, policy.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    for b in active:
        rows[b].stats.count_policy(1, len(rows[b].prefix))
    logits = out.logits[:, -1].float()  # [B_active, V]
    while True:
        allowed = [rows[b].grammar.allowed() if rows[b].grammar is not None else None for b in active]  # per row: [V] or None
        step = sample(_masked_rows(logits, allowed), sampling, [rows[b].generator for b in active])
        keep_rows: list[int] = []
        for row, b in enumerate(active):
            token = int(step[row])
            grammar = rows[b].grammar
            if keep_going is not None and not keep_going(b):
                reason = "cancelled"
            else:
                if grammar is not None:
                    grammar.accept([token])
                reason = _finish(policy, token, tokens[b], rows[b].committed, rows[b].stop, rows[b].budget)
            if reason not in ("eos", "cancelled"):
                tokens[b].append(token)
                rows[b].stats.rollout_tokens += 1
                if on_token is not None:
                    on_token(b, token)
                if keep_logits:
                    kept[b].append(logits[row])
                    if allowed[row] is not None:
                        kept_allowed[b].append(allowed[row])
            if reason is None:
                keep_rows.append(row)
            else:
                stacked = torch.stack(kept[b]) if kept[b] else torch.empty(0, policy.vocab_size)
                masks = None
                if keep_logits and grammar is not None:
                    masks = torch.stack(kept_allowed[b]) if kept_allowed[b] else torch.empty(0, policy.vocab_size, dtype=torch.bool)
                results[b] = Rollout(tokens[b], stacked if keep_logits else None, reason, masks)
        if not keep_rows:
            break
        if len(keep_rows) < len(active):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep_rows, device=policy.device)
            cache.batch_select_indices(index)
            mask, positions, step = mask[index], positions[index], step[index]
            active = [active[r] for r in keep_rows]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = policy.model(
            input_ids=step[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        )
        for b in active:
            rows[b].stats.count_policy(1, 1)
        logits = out.logits[:, -1].float()
    return [r for r in results if r is not None]


def _masked_rows(logits: torch.Tensor, allowed: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The logits to sample from: each row with a grammar mask under it. logits: [B, V]."""
    if all(a is None for a in allowed):
        return logits
    rows = [masked(logits[i], a.to(logits.device)) if a is not None else logits[i] for i, a in enumerate(allowed)]
    return torch.stack(rows)


def _finish(
    policy: Policy, token: int, tokens: list[int], committed: Sequence[int], stop: Sequence[str], budget: int
) -> str | None:
    """Why a row ends after sampling ``token`` (None: it goes on)."""
    if token in policy.eos_ids:
        return "eos"
    if stop:
        # why: a stop string the new token completes lies in the last few tokens; decoding only those keeps
        # each step O(1) instead of O(response). A miss only lets the row run on: the final text is cut in full.
        window = 2 * max(len(s) for s in stop) + 8
        _, hit = cut_at_stop(policy.decode([*committed, *tokens, token][-window:]), stop)
        if hit:
            return "stop"
    if len(tokens) + 1 >= budget:
        return "length"
    return None


@dataclass
class RolloutCall:
    """The rollouts a decoding waits on: its rows, all sampled alike (one :func:`rollout` call's arguments)."""

    rows: list[RolloutRow]
    sampling: Sampling
    keep_logits: bool = False
    on_token: Callable[[int, int], None] | None = None
    """``on_token(row, token)``, ``row`` indexing :attr:`rows`."""


T = TypeVar("T")

Job = Generator[RolloutCall, "list[Rollout]", T]
"""A decoding in progress (a method's batch, a sample set): yields each :class:`RolloutCall` it needs, is sent
their rollouts in row order, returns its outcome. A scheduler may sample the calls of many jobs in one batch."""


def run_alone(policy: Policy, job: Job[T]) -> T:
    """Drive ``job`` by itself: each call it yields is sampled at once, in its own batch."""
    try:
        call = next(job)
        while True:
            call = job.send(rollout(policy, call.rows, call.sampling, call.keep_logits, call.on_token))
    except StopIteration as done:
        return done.value
