"""Shared machinery of rewards computed by a transformer: input layout, batched scoring, cached soft scoring."""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .. import kv
from ..numerics import upcast
from ..tensors import pad_rows
from .base import RewardAdapter, RewardPrefix, Scores, SoftScore
from .vocab import VocabMap, VocabMismatchError, check_vocab

SENTINEL = "NABLALCRESPONSESENTINEL"
"""Placeholder assistant message; the chat template is split around it into head and tail."""


def reply_frame(tokenizer: Any, system: str | None, prompt: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """:func:`chat_frame` of the conversation [system (if any), user: prompt, assistant: the response]."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": SENTINEL}]
    return chat_frame(tokenizer, messages, add_special_tokens=add_special_tokens)


def chat_frame(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    add_special_tokens: bool,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids before and after the response: the chat template rendered around :data:`SENTINEL`.

    ``messages`` holds one message whose content is :data:`SENTINEL`. With ``add_special_tokens`` the
    template's leading BOS is removed and the tokenizer's own prefix tokens are added instead (the
    Skywork-Reward recipe against a duplicated BOS); without it the template text is taken verbatim.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template to a Jinja template")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if text.count(SENTINEL) != 1:
        raise ValueError("the chat template does not render the assistant message verbatim")
    head, tail = text.split(SENTINEL)
    prefix: list[int] = []
    if add_special_tokens:
        bos = tokenizer.bos_token
        if bos and head.startswith(bos):
            head = head[len(bos) :]
        prefix = _special_prefix(tokenizer)
    head_ids = prefix + list(tokenizer(head, add_special_tokens=False)["input_ids"])
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    return head_ids, tail_ids


def _special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before any text (its BOS, when it adds one)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


@dataclass(frozen=True)
class Layout:
    """One reward input: a reward id or a response position per slot, and the slots a score is read at."""

    ids: list[int]
    """Reward token id per slot; -1 where the slot holds a response token."""
    source: list[int]
    """Response position per slot; -1 for fixed slots."""
    reads: list[int]
    """Slots whose hidden state gives a score."""


@dataclass
class TransformerPrefix:
    """A reward prefix's state: the encoded fixed part and the scores already read in it."""

    prompt: str
    committed: list[int]
    length: int
    """Slots encoded."""
    snapshot: kv.Snapshot | None
    """The KV cache of the encoded slots (None when there are none), put back after every soft pass."""
    values: torch.Tensor
    """[R_prefix] scores read inside the prefix."""


class TransformerReward(RewardAdapter[TransformerPrefix]):
    """A reward read from a transformer's hidden states; subclasses choose the template, the reads and the head.

    Inputs are built as ``inputs_embeds``: response tokens (policy ids or soft vectors over the policy
    vocabulary) go through the :class:`~nabla_lc.rewards.vocab.VocabMap`, fixed tokens are reward ids.
    ``score`` and ``score_soft`` share this construction, so they agree at hard one-hots.
    """

    read_last: bool = True
    """Read a score at the last slot (outcome rewards); process rewards read at step tags instead."""

    def __init__(self, body: nn.Module, tokenizer: Any, policy_tokenizer: Any | None, vocab_bridge: bool) -> None:
        self.body = body
        """The transformer without its output layer; returns ``last_hidden_state``."""
        self.tokenizer = tokenizer
        self.vocab_bridge = vocab_bridge
        module = body.get_input_embeddings()
        self.embedding: torch.Tensor = module.weight  # [V_reward, H]
        self.embed_scale = float(getattr(module, "embed_scale", 1.0))  # models that scale inside the embedding module
        self.policy_tokenizer = policy_tokenizer if policy_tokenizer is not None else tokenizer
        rows = int(self.embedding.shape[0])
        if rows < len(tokenizer):  # why: otherwise the first token past the last row fails mid-decode with an IndexError
            raise VocabMismatchError(
                f"{type(self).__name__}: the reward model's input embedding has {rows} rows but its tokenizer has "
                f"{len(tokenizer)} tokens; load the tokenizer that belongs to the reward model"
            )
        self.vocab: VocabMap = check_vocab(self.policy_tokenizer, tokenizer, bridge=vocab_bridge)

    def check_vocab(self, policy_tokenizer: Any) -> None:
        """Build the vocabulary map for ``policy_tokenizer`` (once per tokenizer); raise when it is inexact."""
        if policy_tokenizer is not self.policy_tokenizer:
            self.vocab = check_vocab(policy_tokenizer, self.tokenizer, bridge=self.vocab_bridge)
            self.policy_tokenizer = policy_tokenizer

    # --- what subclasses define -----------------------------------------------------------
    @abstractmethod
    def frame(self, prompt: str) -> tuple[list[int], list[int]]:
        """Reward ids before and after the response for a user prompt."""

    def response_slots(self, response: Sequence[int], final: bool) -> tuple[list[int], list[int], list[int]]:
        """Slots of a response (policy ids): (reward ids, response positions, reads), relative to its start.

        ``final`` is False for the committed part of a DTO run; the slots of a prefix must not change
        when tokens are appended.
        """
        n = len(response)
        return [-1] * n, list(range(n)), []

    @abstractmethod
    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores at read slots. hidden: [R, H] -> [R] float32."""

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        """The reward of one input from the scores at its reads ([R] -> scalar)."""
        return values[-1]

    @contextlib.contextmanager
    def reward_pass(self) -> Iterator[None]:
        """Context of every forward pass of :attr:`body` (the LoRA reward switches its adapter on here)."""
        yield

    # --- layout and embeddings ------------------------------------------------------------
    def layout(self, prompt: str, response: Sequence[int], final: bool = True) -> Layout:
        """Slots for ``head + response (+ tail when final)``."""
        head, tail = self.frame(prompt)
        ids, src, reads = list(head), [-1] * len(head), []
        r_ids, r_src, r_reads = self.response_slots(response, final)
        reads += [len(ids) + k for k in r_reads]
        ids += r_ids
        src += r_src
        if final:
            ids += tail
            src += [-1] * len(tail)
            if self.read_last:
                reads.append(len(ids) - 1)
        return Layout(ids, src, reads)

    def embeds(self, ids: Sequence[int], source: Sequence[int], response: torch.Tensor) -> torch.Tensor:
        """Input vectors of slots. response: [n, H] vectors of the response positions; returns [T, H]."""
        dev = self.embedding.device
        ids_t = torch.tensor(list(ids), dtype=torch.long, device=dev)
        src_t = torch.tensor(list(source), dtype=torch.long, device=dev)
        out = self.embedding[ids_t.clamp(min=0)]
        if response.shape[0]:
            out = torch.where((src_t >= 0)[:, None], response[src_t.clamp(min=0)], out)
        return out * self.embed_scale if self.embed_scale != 1.0 else out

    def forward_hidden(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: kv.Cache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Last hidden states. embeds: [B, T, H] -> [B, T, H]; with ``cache``, continues at position ``start`` (or
        at ``start[b]`` for row b, a [B] tensor)."""
        T = embeds.shape[1]
        steps = torch.arange(T, device=embeds.device)[None]
        positions = start.to(embeds.device)[:, None] + steps if isinstance(start, torch.Tensor) else (start + steps).expand(embeds.shape[0], T)
        with self.reward_pass():
            out = self.body(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    # --- the RewardAdapter interface ------------------------------------------------------
    def values(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Rewards [B] (with whatever gradients are enabled) and the tokens processed."""
        values, tokens = self._values(prompts, responses)
        return values, sum(tokens)

    def _values(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
        """Rewards [B] and the tokens processed for each response."""
        reads, tokens = self._reads(prompts, responses)
        return upcast(torch.stack([self.combine(r) for r in reads])), tokens

    def reads(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The scores at each response's reads ([R_b] each, before :meth:`combine`), with whatever gradients are enabled."""
        return self._reads(prompts, responses)[0]

    def _reads(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[int]]:
        layouts = [self.layout(p, r) for p, r in zip(prompts, responses)]
        dev = self.embedding.device
        T = max(len(lay.ids) for lay in layouts)
        rows, mask = [], torch.zeros(len(layouts), T, dtype=torch.long, device=dev)
        for b, (lay, resp) in enumerate(zip(layouts, responses)):
            vecs = self.vocab.embed_ids(torch.tensor(list(resp), dtype=torch.long), self.embedding)
            e = self.embeds(lay.ids, lay.source, vecs)
            rows.append(torch.cat([e, e.new_zeros(T - e.shape[0], e.shape[1])]))  # right padding: reads never see it
            mask[b, : e.shape[0]] = 1
        hidden = self.forward_hidden(torch.stack(rows), mask)
        return [self.read(hidden[b, lay.reads]) for b, lay in enumerate(layouts)], [len(lay.ids) for lay in layouts]

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if not responses:
            return Scores(torch.zeros(0), 0, 0)
        with torch.no_grad():
            values, tokens = self.values(prompts, responses)
        return Scores(values.cpu(), len(responses), tokens)

    def score_groups(
        self, groups: Sequence[tuple[Sequence[str], Sequence[Sequence[int]]]], prefixes: Sequence[RewardPrefix[TransformerPrefix] | None] | None = None
    ) -> list[Scores]:
        """One pass over the groups scored whole (right-padded rows, as :meth:`score` runs a group's) and one over
        the groups scored after their prefixes (:meth:`_after_prefix`); a group is scored after its prefix only if
        every one of its responses continues it, so a group's responses are always scored alike."""
        for group_prompts, group_responses in groups:
            if len(group_prompts) != len(group_responses):
                raise ValueError(f"{len(group_prompts)} prompts for {len(group_responses)} responses")
        given = list(prefixes) if prefixes is not None else [None] * len(groups)
        after = {g: lays for g, (group, prefix) in enumerate(zip(groups, given)) if (lays := self._after_prefix(prefix, *group)) is not None}
        if len(groups) < 2 and not after:
            return super().score_groups(groups)
        found: dict[int, Scores] = {}
        with torch.no_grad():
            whole = [g for g in range(len(groups)) if g not in after and groups[g][1]]
            if whole:
                values, tokens = self._values([p for g in whole for p in groups[g][0]], [r for g in whole for r in groups[g][1]])
                found.update(_split(whole, [len(groups[g][1]) for g in whole], values.cpu(), tokens))
            if after:
                rows = [(given[g], lay, response) for g, lays in after.items() for lay, response in zip(lays, groups[g][1])]
                values, tokens = self._values_after(rows)  # type: ignore[arg-type]
                found.update(_split(list(after), [len(groups[g][1]) for g in after], values.cpu(), tokens))
        return [found.get(g, Scores(torch.zeros(0), 0, 0)) for g in range(len(groups))]

    def _after_prefix(self, prefix: RewardPrefix[TransformerPrefix] | None, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> list[Layout] | None:
        """The layouts of a group's responses when every one continues ``prefix`` slot for slot with at least one slot
        of its own and no slot after the prefix reads a committed token; else None (the group is scored whole)."""
        if prefix is None or not responses:
            return None
        state, lays = prefix.state, []
        for prompt, response in zip(prompts, responses):
            lay = self._continuation(state, prompt, response, final=True)
            if lay is None or len(lay.ids) == state.length or any(0 <= s < len(state.committed) for s in lay.source[state.length :]):
                return None
            lays.append(lay)
        return lays

    def _continuation(self, state: TransformerPrefix, prompt: str, response: Sequence[int], final: bool) -> Layout | None:
        """The layout of ``response`` if it continues ``state``'s prefix: the same prompt, the committed tokens first,
        the prefix's slots and reads unchanged (a bridged vocabulary may re-split them); else None."""
        response, P = list(response), state.length
        if prompt != state.prompt or state.snapshot is None or response[: len(state.committed)] != state.committed:
            return None
        lay = self.layout(prompt, response, final)
        old = self.layout(prompt, state.committed, final=False)
        same = lay.ids[:P] == old.ids and lay.source[:P] == old.source and [r for r in lay.reads if r < P] == old.reads
        return lay if same else None

    def _values_after(self, rows: Sequence[tuple[RewardPrefix[TransformerPrefix], Layout, Sequence[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Rewards [B] of (prefix, layout, response) rows, each encoding only the slots after its prefix, and the
        tokens processed for each."""
        inputs = []
        for prefix, lay, response in rows:
            c = len(prefix.state.committed)
            inputs.append(self._embeds_after(prefix.state, lay, self.vocab.embed_ids(torch.tensor(list(response[c:]), dtype=torch.long), self.embedding)))
        hidden = self._forward_after([prefix for prefix, _, _ in rows], [e for e, _ in inputs])
        values = [self.combine(torch.cat([p.state.values, self.read(hidden[b, reads])])) for b, ((p, _, _), (_, reads)) in enumerate(zip(rows, inputs))]
        return upcast(torch.stack(values)), [e.shape[0] for e, _ in inputs]

    def _forward_after(self, prefixes: Sequence[RewardPrefix[TransformerPrefix]], embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Hidden states [B, T, H] of rows of input vectors ([T_b, H], right-padded) after their prefixes' caches
        (left-padded into one; the prefixes' own caches are not touched)."""
        padded, new_mask = pad_rows(list(embeds))
        cache, prefix_mask = kv.stack([p.state.snapshot for p in prefixes])  # type: ignore[misc]
        starts = torch.tensor([p.state.length for p in prefixes])
        return self.forward_hidden(padded, torch.cat([prefix_mask, new_mask.to(prefix_mask.device)], dim=1), cache=cache, start=starts)

    def prepare(self, prompt: str, committed: Sequence[int]) -> RewardPrefix[TransformerPrefix]:
        lay = self.layout(prompt, list(committed), final=False)
        P = len(lay.ids)
        values = torch.zeros(0, device=self.embedding.device)
        if P == 0:
            return RewardPrefix(TransformerPrefix(prompt, list(committed), 0, None, values), 0, 0)
        cache = kv.empty()
        with torch.no_grad():
            vecs = self.vocab.embed_ids(torch.tensor(list(committed), dtype=torch.long), self.embedding)
            hidden = self.forward_hidden(self.embeds(lay.ids, lay.source, vecs)[None], cache=cache)
            if lay.reads:
                values = self.read(hidden[0, lay.reads])
        return RewardPrefix(TransformerPrefix(prompt, list(committed), P, kv.Snapshot.take(cache), values), 1, P)

    def extend(self, prefix: RewardPrefix[TransformerPrefix], prompt: str, committed: Sequence[int]) -> RewardPrefix[TransformerPrefix]:
        state = prefix.state
        committed = list(committed)
        P = state.length
        lay = self._continuation(state, prompt, committed, final=False)
        if lay is None:  # why: a layout that is not append-only (a bridged vocabulary may re-split) is encoded afresh
            return self.prepare(prompt, committed)
        if len(lay.ids) == P:
            return RewardPrefix(TransformerPrefix(prompt, committed, P, state.snapshot, state.values), 0, 0)
        cache = state.snapshot.cache
        with torch.no_grad():
            vecs = self.vocab.embed_ids(torch.tensor(committed, dtype=torch.long), self.embedding)
            hidden = self.forward_hidden(self.embeds(lay.ids[P:], lay.source[P:], vecs)[None], cache=cache, start=P)
            reads = [r - P for r in lay.reads if r >= P]
            values = torch.cat([state.values, self.read(hidden[0, reads])]) if reads else state.values
        return RewardPrefix(TransformerPrefix(prompt, committed, len(lay.ids), kv.Snapshot.take(cache), values), 1, len(lay.ids) - P)

    def _soft_input(self, prefix: RewardPrefix[TransformerPrefix], y: torch.Tensor, vecs: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """The input vectors after the prefix ([T, H]) of ``committed + y`` and the reads among them; ``vecs``: y's
        reward input vectors ([L, H]) when already computed."""
        # y: [L, V_policy] soft token vectors; the response is committed + y
        state = prefix.state
        lay = self.layout(state.prompt, state.committed + y.detach().argmax(-1).tolist())
        if any(0 <= s < len(state.committed) for s in lay.source[state.length :]):
            raise RuntimeError(f"{type(self).__name__}.response_slots changed the slots of committed tokens")
        return self._embeds_after(state, lay, self.vocab.embed(y, self.embedding) if vecs is None else vecs)

    def _embeds_after(self, state: TransformerPrefix, lay: Layout, vecs: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The input vectors of ``lay``'s slots after the prefix ([T, H]) and the reads among them (relative to it);
        ``vecs``: the reward input vectors of the response tokens after the committed ones ([L, H])."""
        P, c = state.length, len(state.committed)
        src = [s - c if s >= 0 else -1 for s in lay.source[P:]]
        return self.embeds(lay.ids[P:], src, vecs), [r - P for r in lay.reads if r >= P]

    def _soft_score(self, prefix: RewardPrefix[TransformerPrefix], hidden: torch.Tensor, reads: list[int]) -> SoftScore:
        """The score of one row from its hidden states after the prefix ([T, H])."""
        values = torch.cat([prefix.state.values, self.read(hidden[reads])])
        return SoftScore(upcast(self.combine(values)), 1, hidden.shape[0])

    def score_soft(self, prefix: RewardPrefix[TransformerPrefix], y: torch.Tensor) -> SoftScore:
        state = prefix.state
        embeds, reads = self._soft_input(prefix, y)
        try:
            hidden = self.forward_hidden(embeds[None], cache=state.snapshot.cache if state.snapshot is not None else None, start=state.length)
        finally:
            if state.snapshot is not None:
                state.snapshot.restore()  # why: the next DTO step reuses the prefix entries only, graph-free
        return self._soft_score(prefix, hidden[0], reads)

    def score_soft_batch(self, prefixes: Sequence[RewardPrefix[TransformerPrefix]], ys: Sequence[torch.Tensor]) -> list[SoftScore]:
        """One pass over every row: the prefixes' caches left-padded into one, the rows after them right-padded."""
        if len(prefixes) < 2:
            return super().score_soft_batch(prefixes, ys)
        snapshots = [p.state.snapshot for p in prefixes]
        if any(s is None for s in snapshots):
            return super().score_soft_batch(prefixes, ys)
        # why: one [tokens, V] x [V, H] product for every row (and one in the backward), not one a row
        vecs = self.vocab.embed(torch.cat(list(ys)), self.embedding).split([y.shape[0] for y in ys])
        inputs = [self._soft_input(p, y, v) for p, y, v in zip(prefixes, ys, vecs)]
        lengths = [e.shape[0] for e, _ in inputs]
        hidden = self._forward_after(prefixes, [e for e, _ in inputs])
        return [self._soft_score(p, hidden[b, :n], reads) for b, (p, n, (_, reads)) in enumerate(zip(prefixes, lengths, inputs))]


def exact_vocab(policy_tokenizer: Any, tokenizer: Any, owner: str) -> None:
    """Raise unless the policy's vocabulary is identical to ``tokenizer``'s (rewards that reuse the policy's model)."""
    vocab = check_vocab(policy_tokenizer, tokenizer)
    if vocab.kind != "identity":
        raise VocabMismatchError(f"{owner} reuses the policy's model, so it needs the policy's exact vocabulary")


def _split(groups: Sequence[int], sizes: Sequence[int], values: torch.Tensor, tokens: Sequence[int]) -> dict[int, Scores]:
    """Per group, the :class:`Scores` of its consecutive rows of ``values`` and ``tokens``."""
    out, start = {}, 0
    for g, n in zip(groups, sizes):
        out[g] = Scores(values[start : start + n], n, sum(tokens[start : start + n]))
        start += n
    return out
