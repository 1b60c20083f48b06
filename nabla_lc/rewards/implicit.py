"""An implicit (DPO-style) reward on the policy's backbone: r = Σ_s log π_θ(t_s | t_<s) − log π(t_s | t_<s).

π_θ is the policy with a LoRA adapter switched on, π the policy itself; s runs over the response and the
template's closing tokens. Each response token enters its own term linearly (⟨y_s, log-probability ratio⟩), so
the reward's gradient at a position holds the exact change of that term under a token swap; a scalar head read
at the last slot has no such term, and its gradient did not predict swaps (docs/default-reward.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import upcast
from .base import RewardPrefix, Scores, SoftScore
from .lora import LoRAReward
from .transformer import TransformerPrefix


class ImplicitLoRAReward(LoRAReward):
    """The log-probability ratio of the policy with and without a LoRA adapter, summed over the response.

    Trained like the scalar LoRA reward (Bradley-Terry on the ratio, as DPO does); no prefix cache: every
    soft score runs the whole input twice (adapter on and off), and is counted so.
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

    def _ratio(self, embeds: torch.Tensor, mask: torch.Tensor | None, spans: Sequence[tuple[int, int]], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Summed log-probability ratios. embeds: [B, T, H]; spans[b]: the scored slots [first, end), the response
        and the template's tail; targets[b]: their tokens, [S_b, V] (soft) or [S_b] (ids). -> [B] float32."""
        lm_head = self.model.get_output_embeddings()
        out = []
        hidden_on = self.forward_hidden(embeds, mask)  # [B, T, H]
        with self.reference():
            hidden_off = self.body(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        for b, ((first, end), target) in enumerate(zip(spans, targets)):
            # why: slot s is predicted from slot s - 1; only the scored slots go through the [H, V] head
            on = F.log_softmax(lm_head(hidden_on[b, first - 1 : end - 1]).float(), -1)  # [S, V]
            off = F.log_softmax(lm_head(hidden_off[b, first - 1 : end - 1]).float(), -1)
            ratio = on - off
            picked = (ratio * target).sum(-1) if target.dim() == 2 else ratio.gather(-1, target[:, None])[:, 0]
            out.append(picked.sum())
        return upcast(torch.stack(out))

    def first_scored(self, prompt: str) -> int:
        """The first scored slot: the response's first token (the template's head is not scored)."""
        return len(self.frame(prompt)[0])

    def values(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        lays = [self.layout(p, r) for p, r in zip(prompts, responses)]
        dev = self.embedding.device
        T = max(len(lay.ids) for lay in lays)
        rows, mask, targets = [], torch.zeros(len(lays), T, dtype=torch.long, device=dev), []
        spans: list[tuple[int, int]] = []
        for b, (lay, prompt, resp) in enumerate(zip(lays, prompts, responses)):
            ids = torch.tensor(list(resp), dtype=torch.long, device=dev)
            e = self.embeds(lay.ids, lay.source, self.vocab.embed_ids(ids, self.embedding))
            rows.append(torch.cat([e, e.new_zeros(T - e.shape[0], e.shape[1])]))  # right padding: no slot reads it
            mask[b, : e.shape[0]] = 1
            slot_ids = [resp[s] if s >= 0 else i for i, s in zip(lay.ids, lay.source)]
            first = self.first_scored(prompt)
            targets.append(torch.tensor(slot_ids[first:], dtype=torch.long, device=dev))
            spans.append((first, len(lay.ids)))
        values = self._ratio(torch.stack(rows), mask, spans, targets)
        return values, 2 * sum(len(lay.ids) for lay in lays)

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        scores = super().score(prompts, responses)
        return Scores(scores.values, 2 * scores.passes, scores.tokens)  # two passes a response: adapter on and off

    def prepare(self, prompt: str, committed: Sequence[int]) -> RewardPrefix[TransformerPrefix]:
        empty = torch.zeros(0, device=self.embedding.device)
        return RewardPrefix(TransformerPrefix(prompt, list(committed), 0, None, empty), 0, 0)

    def extend(self, prefix: RewardPrefix[TransformerPrefix], prompt: str, committed: Sequence[int]) -> RewardPrefix[TransformerPrefix]:
        return self.prepare(prompt, committed)

    def score_soft(self, prefix: RewardPrefix[TransformerPrefix], y: torch.Tensor) -> SoftScore:
        # y: [L, V] soft token vectors after the committed tokens
        state = prefix.state
        committed = state.committed
        c, dev = len(committed), self.embedding.device
        lay = self.layout(state.prompt, committed + y.detach().argmax(-1).tolist())
        hard = self.vocab.embed_ids(torch.tensor(committed, dtype=torch.long, device=dev), self.embedding)  # [c, H]
        vecs = torch.cat([hard, self.vocab.embed(y, self.embedding).to(hard.dtype)])  # [c + L, H]
        V = y.shape[-1]
        slot_targets = []
        for i, s in zip(lay.ids, lay.source):
            if 0 <= s < c or s < 0:
                slot_targets.append(F.one_hot(torch.tensor(committed[s] if s >= 0 else i, device=dev), V).to(y.dtype))
            else:
                slot_targets.append(y[s - c])
        first = self.first_scored(state.prompt)
        target = torch.stack(slot_targets[first:])  # [S, V]
        value = self._ratio(self.embeds(lay.ids, lay.source, vecs)[None], None, [(first, len(lay.ids))], [target])[0]
        return SoftScore(value, 2, 2 * len(lay.ids))

