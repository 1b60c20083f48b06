"""An implicit (DPO-style) reward on the policy's backbone: r = Σ_s log π_θ(t_s | t_<s) − log π(t_s | t_<s).

π_θ is the policy with a LoRA adapter switched on, π the policy itself; s runs over the response and the
template's closing tokens. Each response token enters its own term linearly (⟨y_s, log-probability ratio⟩), so
the reward's gradient at a position holds the exact change of that term under a token swap; a scalar head read
at the last slot has no such term, and its gradient did not predict swaps (docs/default-reward.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import kv
from ..numerics import upcast
from .base import RewardAdapter, RewardPrefix, Scores, SoftScore
from .lora import LoRAReward


@dataclass
class ImplicitPrefix:
    """The encoded template head and committed tokens, with the adapter on and off."""

    prompt: str
    committed: list[int]
    length: int
    """Slots encoded."""
    on: kv.Snapshot
    off: kv.Snapshot
    value: torch.Tensor
    """Scalar: the ratio terms of the committed tokens."""
    next_ratio: torch.Tensor
    """[V] log π_θ − log π of the slot after the prefix, read from its last slot."""


class ImplicitLoRAReward(LoRAReward):
    """The log-probability ratio of the policy with and without a LoRA adapter, summed over the response.

    Trained like the scalar LoRA reward (Bradley-Terry on the ratio, as DPO does). Every scored input runs twice
    (adapter on and off), and both passes are counted; a prefix keeps a KV cache of each.
    """

    head_kind = "implicit"

    def __init__(self, policy_model: nn.Module, tokenizer: Any, **settings: Any) -> None:
        if settings.get("step_separator") is not None:
            raise ValueError("an implicit reward scores every token; it takes no step_separator")
        super().__init__(policy_model, tokenizer, **settings)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The adapter off for the enclosed passes, even inside :meth:`adapter`; restored on exit."""
        self._switch(False)
        try:
            yield
        finally:
            self._switch(self._depth > 0)

    def first_scored(self, prompt: str) -> int:
        """The first scored slot: the response's first token (the template's head is not scored)."""
        return len(self.frame(prompt)[0])

    def _hidden(
        self, embeds: torch.Tensor, mask: torch.Tensor | None, on: bool, cache: kv.Cache | None = None, start: int = 0
    ) -> torch.Tensor:
        """Last hidden states with the adapter on or off. embeds: [B, T, H] -> [B, T, H]."""
        if on:
            return self.forward_hidden(embeds, mask, cache, start)
        T = embeds.shape[1]
        positions = torch.arange(start, start + T, device=embeds.device)[None].expand(embeds.shape[0], T)
        with self.reference():
            out = self.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def _ratios(self, hidden_on: torch.Tensor, hidden_off: torch.Tensor) -> torch.Tensor:
        """log π_θ − log π of the next token at each slot. hidden: [S, H] -> [S, V] float32."""
        lm_head = self.model.get_output_embeddings()
        return F.log_softmax(lm_head(hidden_on).float(), -1) - F.log_softmax(lm_head(hidden_off).float(), -1)

    def values(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        lays = [self.layout(p, r) for p, r in zip(prompts, responses)]
        dev = self.embedding.device
        T = max(len(lay.ids) for lay in lays)
        rows, mask = [], torch.zeros(len(lays), T, dtype=torch.long, device=dev)
        for b, (lay, resp) in enumerate(zip(lays, responses)):
            ids = torch.tensor(list(resp), dtype=torch.long, device=dev)
            e = self.embeds(lay.ids, lay.source, self.vocab.embed_ids(ids, self.embedding))
            rows.append(torch.cat([e, e.new_zeros(T - e.shape[0], e.shape[1])]))  # right padding: no scored slot reads it
            mask[b, : e.shape[0]] = 1
        embeds = torch.stack(rows)  # [B, T, H]
        hidden_on, hidden_off = self._hidden(embeds, mask, True), self._hidden(embeds, mask, False)
        out = []
        for b, (lay, prompt, resp) in enumerate(zip(lays, prompts, responses)):
            first, end = self.first_scored(prompt), len(lay.ids)
            targets = torch.tensor([resp[s] if s >= 0 else i for i, s in zip(lay.ids[first:], lay.source[first:])], device=dev)
            # why: slot s is predicted from slot s - 1; only the scored slots go through the [H, V] output layer
            ratios = self._ratios(hidden_on[b, first - 1 : end - 1], hidden_off[b, first - 1 : end - 1])  # [S, V]
            out.append(ratios.gather(-1, targets[:, None]).sum())
        return upcast(torch.stack(out)), 2 * sum(len(lay.ids) for lay in lays)

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        scores = super().score(prompts, responses)
        return Scores(scores.values, 2 * scores.passes, scores.tokens)  # two passes a response: adapter on and off

    def prepare(self, prompt: str, committed: Sequence[int]) -> RewardPrefix[ImplicitPrefix]:
        committed = list(committed)
        lay = self.layout(prompt, committed, final=False)
        first, P, dev = self.first_scored(prompt), len(lay.ids), self.embedding.device
        caches = kv.empty(), kv.empty()
        with torch.no_grad():
            vecs = self.vocab.embed_ids(torch.tensor(committed, dtype=torch.long, device=dev), self.embedding)
            embeds = self.embeds(lay.ids, lay.source, vecs)[None]  # [1, P, H]
            hidden_on = self._hidden(embeds, None, True, caches[0])[0]
            hidden_off = self._hidden(embeds, None, False, caches[1])[0]
            ratios = self._ratios(hidden_on[first - 1 :], hidden_off[first - 1 :])  # [P - first + 1, V]
            targets = torch.tensor(committed, dtype=torch.long, device=dev)
            value = ratios[:-1].gather(-1, targets[:, None]).sum()
        state = ImplicitPrefix(prompt, committed, P, kv.Snapshot.take(caches[0]), kv.Snapshot.take(caches[1]), value, ratios[-1])
        return RewardPrefix(state, 2, 2 * P)

    def extend(self, prefix: RewardPrefix[ImplicitPrefix], prompt: str, committed: Sequence[int]) -> RewardPrefix[ImplicitPrefix]:
        state, committed = prefix.state, list(committed)
        c = len(state.committed)
        if prompt != state.prompt or committed[:c] != state.committed:
            return self.prepare(prompt, committed)
        added = committed[c:]
        if not added:
            return RewardPrefix(state, 0, 0)
        dev = self.embedding.device
        with torch.no_grad():  # why: encode only the new tokens on both caches (the layout is head + committed, append-only)
            vecs = self.vocab.embed_ids(torch.tensor(committed, dtype=torch.long, device=dev), self.embedding)
            embeds = self.embeds([-1] * len(added), list(range(c, len(committed))), vecs)[None]  # [1, n, H]
            hidden_on = self._hidden(embeds, None, True, state.on.cache, state.length)[0]
            hidden_off = self._hidden(embeds, None, False, state.off.cache, state.length)[0]
            ratios = torch.cat([state.next_ratio[None], self._ratios(hidden_on, hidden_off)])  # [n + 1, V]
            value = state.value + ratios[:-1].gather(-1, torch.tensor(added, device=dev)[:, None]).sum()
        P = state.length + len(added)
        on, off = kv.Snapshot.take(state.on.cache), kv.Snapshot.take(state.off.cache)
        return RewardPrefix(ImplicitPrefix(prompt, committed, P, on, off, value, ratios[-1]), 2, 2 * len(added))

    def score_soft(self, prefix: RewardPrefix[ImplicitPrefix], y: torch.Tensor) -> SoftScore:  # type: ignore[override]
        # y: [L, V] soft token vectors after the committed tokens
        state = prefix.state
        c, P = len(state.committed), state.length
        lay = self.layout(state.prompt, state.committed + y.detach().argmax(-1).tolist())
        ids, src = lay.ids[P:], [s - c if s >= 0 else -1 for s in lay.source[P:]]
        embeds = self.embeds(ids, src, self.vocab.embed(y, self.embedding))[None]  # [1, S, H]
        try:
            hidden_on = self._hidden(embeds, None, True, state.on.cache, P)[0]
            hidden_off = self._hidden(embeds, None, False, state.off.cache, P)[0]
        finally:
            state.on.restore()  # why: the next DTO step reuses the prefix entries only, graph-free
            state.off.restore()
        ratios = torch.cat([state.next_ratio[None], self._ratios(hidden_on[:-1], hidden_off[:-1])])  # [S, V]
        V = ratios.shape[-1]
        targets = torch.stack([y[s] if s >= 0 else F.one_hot(torch.tensor(i, device=y.device), V).to(y.dtype) for i, s in zip(ids, src)])
        value = state.value + (ratios * targets.to(ratios.dtype)).sum()
        return SoftScore(upcast(value), 2, 2 * len(ids))

    def score_soft_batch(self, prefixes: Sequence[RewardPrefix[ImplicitPrefix]], ys: Sequence[torch.Tensor]) -> list[SoftScore]:  # type: ignore[override]
        """Row by row: each row continues its own adapter-on and adapter-off prefix caches (:meth:`score_soft`)."""
        return RewardAdapter.score_soft_batch(self, prefixes, ys)

    def score_groups(  # type: ignore[override]
        self, groups: Sequence[tuple[Sequence[str], Sequence[Sequence[int]]]], prefixes: Sequence[RewardPrefix[ImplicitPrefix] | None] | None = None
    ) -> list[Scores]:
        """Group by group, whole (:meth:`score`, adapter on and off)."""
        return RewardAdapter.score_groups(self, groups)
