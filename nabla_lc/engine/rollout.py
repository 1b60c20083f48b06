"""Batched autoregressive sampling from existing prefixes, with a KV cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import kv
from ..tensors import cat_left_padded
from .accounting import Stats
from .constraints import Grammar, masked
from .policy import Policy
from .stream import cut_at_stop


@dataclass(frozen=True)
class Sampling:
    """How to draw a token from logits."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class RowCache:
    """The KV cache a finished rollout row leaves: its prefix and every sampled token fed back (all but the last),
    copied out of the batch's cache."""

    ids: list[int]
    """The tokens the entries are of."""
    cache: kv.Cache
    """One row of len(ids) columns."""

    def head(self, n: int) -> kv.Cache:
        """A cache of the first ``n`` entries (:func:`nabla_lc.kv.head`)."""
        if n > len(self.ids):
            raise ValueError(f"the row's cache holds {len(self.ids)} entries, not {n}")
        return kv.head(self.cache, n)


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
    cache: RowCache | None = None
    """The row's KV cache (None unless its row asked for it: :attr:`RolloutRow.keep_cache`)."""

    def drop(self, k: int) -> "Rollout":
        """The rollout without its first k tokens (their logits and masks too; the cache stays whole)."""
        assert self.logits is not None
        allowed = self.allowed[k:] if self.allowed is not None else None
        return Rollout(self.tokens[k:], self.logits[k:], self.finish_reason, allowed, self.cache)


def keyed_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by a hash of ``key``: the same key draws the same numbers in any batch and
    process (on one kind of device: a CUDA generator's stream is not a CPU one's)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


NUCLEUS_CANDIDATES = 256
"""How many top tokens :func:`filter_logits` looks at before it sorts a whole vocabulary for the top-p nucleus."""


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and the top-p nucleus. logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        drop = _outside_nucleus_of_candidates(logits, top_p)
        logits = logits.masked_fill(drop if drop is not None else _outside_nucleus(logits, top_p), float("-inf"))
    return logits


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] bool: the tokens after the top-p nucleus in a sort of the whole vocabulary (the token that crosses
    top_p is kept)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


def _outside_nucleus_of_candidates(logits: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """:func:`_outside_nucleus` from the top :data:`NUCLEUS_CANDIDATES` tokens only (no sort of the vocabulary), or
    None where that cannot decide: a row's nucleus reaches past them, or a tie straddles its edge."""
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    top = torch.topk(logits, k, dim=-1).values  # [B, k], descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
    kept = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True)  # [B, 1]: the nucleus is the first `kept`
    last, first_out = top.gather(-1, (kept - 1).clamp(min=0)), top.gather(-1, kept.clamp(max=k - 1))
    # why: kept < 1 only where a row has no finite logit; one check, so one device sync
    if bool(((kept < 1) | (kept >= k) | (last <= first_out)).any()):
        return None
    return logits < last


def sample(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row, on the logits' device. logits: [B, V] -> [B]. Each row draws from its own generator (on
    that device; None: the device's global one).

    The draw is ``torch.multinomial``'s for one sample, written out: the argmax of p / q with q ~ Exp(1) drawn from
    the row's generator. On a CPU tensor it is the same draw from the same generator, token for token.
    why: no row's probabilities go to the host, and one validity check serves the batch (multinomial syncs per row)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / sampling.temperature, sampling.top_p, sampling.top_k).softmax(-1)
    if not bool(probs.isfinite().all()):  # multinomial's own check (a softmax is never negative)
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    q = torch.stack([torch.empty_like(probs[b]).exponential_(1, generator=generators[b]) for b in range(probs.shape[0])])
    return (probs / q).argmax(-1)


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
    own_stop: Sequence[str] = ()
    """Stop strings looked for in this row's own tokens only, not across ``committed`` (a step separator, which
    ends the earlier steps); finish reason ``stop`` too."""
    noise: int | None = None
    """When set, the token at response position p is drawn with a generator seeded by (``noise``, p) instead of
    ``generator``: rows that share it draw the same randomness at the same position (common random numbers)."""
    keep_cache: bool = False
    """Whether the rollout keeps the row's KV cache (:attr:`Rollout.cache`; ∇ encodes its DTO prefixes from it)."""

    def draw_generator(self, position: int, device: torch.device) -> torch.Generator | None:
        """The generator of the draw at response ``position`` (a keyed one on ``device``, the logits')."""
        return self.generator if self.noise is None else keyed_generator(f"{self.noise}:{position}", device)


@torch.no_grad()
def rollout(
    policy: Policy,
    rows: Sequence[RolloutRow],
    sampling: Sampling,
    keep_logits: bool = False,
    on_token: Callable[[int, int], None] | None = None,
    keep_going: Callable[[int], bool] | None = None,
) -> list[Rollout]:
    """Sample one continuation per row, all in one batch (a :class:`RolloutBatch` that no row joins later).

    Finished rows leave the batch (their KV rows are dropped), so every counted pass is real work.
    ``on_token(row, token)`` sees each kept token as it is sampled. A row with a grammar samples under its
    mask (the kept logits stay the policy's own; the masks are kept beside them). A row for which ``keep_going(row)``
    is false before a step leaves the batch at once, its rollout ending ``cancelled``. A row whose own work fails
    raises its error.
    """
    batch = RolloutBatch(policy, sampling, keep_logits, on_token, keep_going)
    results: dict[int, Rollout] = dict(batch.add(rows))
    while batch.busy:
        for b, result in batch.step():
            if isinstance(result, Exception):
                raise result
            results[b] = result
    return [results[b] for b in range(len(rows))]


class RolloutBatch:
    """Rollouts in progress in one batch, all sampled alike; rows may join between steps.

    :meth:`add` encodes new rows' prefixes in one pass and merges their KV cache into the batch's (the shorter
    side left-padded, masked); :meth:`step` samples one token for every active row. Rows are numbered in the order
    they were added; ``on_token`` and ``keep_going`` see those numbers (see :func:`rollout`).

    With ``prefill_chunk``, a row whose prefix is longer than that many tokens is not encoded at once: each
    :meth:`step` encodes the next ``prefill_chunk`` tokens of one such row (after sampling the active rows' tokens;
    the row with the fewest tokens left first), and the row joins once its whole prefix is encoded, so one long prompt delays the other rows' tokens by
    one chunk's pass a step instead of by its whole prefill (vLLM's chunked prefill). Its pass is counted as one
    pass over its prefix, as unchunked.
    """

    def __init__(
        self,
        policy: Policy,
        sampling: Sampling,
        keep_logits: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        keep_going: Callable[[int], bool] | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        self.policy, self.sampling, self.keep_logits, self.on_token, self.keep_going = policy, sampling, keep_logits, on_token, keep_going
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[_Prefill] = []
        """Rows whose prefixes are being encoded a chunk a step (not yet in :attr:`active`)."""
        self.rows: dict[int, RolloutRow] = {}
        """Rows not yet finished, by number."""
        self.count = 0
        self.tokens: dict[int, list[int]] = {}
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.kept_allowed: dict[int, list[torch.Tensor]] = {}
        self.active: list[int] = []
        """Row numbers in batch order."""
        self.cache: kv.Cache | None = None
        self.mask: torch.Tensor | None = None  # [A, L]
        self.last_position: torch.Tensor | None = None  # [A, 1]
        self.logits: torch.Tensor | None = None  # [A, V]: the next token's, not yet sampled

    def add(self, rows: Sequence[RolloutRow]) -> list[tuple[int, Rollout]]:
        """Join ``rows`` (numbered from :attr:`count` on); rows with no budget finish at once and are returned.

        Atomic: if encoding or merging raises, the batch is as it was (no row joined, :attr:`count` unchanged)."""
        policy, done, new = self.policy, [], []
        long: list[_Prefill] = []
        for j, row in enumerate(rows):
            if row.budget > 0 and self.prefill_chunk is not None and len(row.prefix) > self.prefill_chunk:
                long.append(_Prefill(self.count + j, row))
            elif row.budget > 0:
                new.append((self.count + j, row))
            else:
                done.append((self.count + j, self._empty_rollout(row, "length")))
        if new:
            ids, mask = _left_pad([row.prefix for _, row in new], policy.pad_id, policy.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = kv.empty()
            out = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            self._join(new, cache, mask, positions, out.logits[:, -1].float())
        self.prefilling.extend(long)
        self.count += len(rows)
        return done

    @property
    def busy(self) -> bool:
        """Whether rows are decoding or being prefilled (:meth:`step` has work)."""
        return bool(self.active or self.prefilling)

    def _join(self, new: list[tuple[int, RolloutRow]], cache: kv.Cache, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Merge the new rows, their prefixes encoded (``cache``, ``mask`` and ``positions`` [B_new, L], the next
        token's ``logits`` [B_new, V]), into the batch; the bookkeeping changes only once the merge worked."""
        if self.cache is None:
            self.cache, self.mask, self.last_position, self.logits = cache, mask, positions[:, -1:], logits
        else:
            assert self.mask is not None and self.last_position is not None and self.logits is not None
            merged_mask = cat_left_padded(self.mask, mask)
            last_position, all_logits = torch.cat([self.last_position, positions[:, -1:]]), torch.cat([self.logits, logits])
            kv.merge_rows(self.cache, cache)  # atomic: on failure the batch's cache is as it was
            self.mask, self.last_position, self.logits = merged_mask, last_position, all_logits
        for b, row in new:
            self.rows[b], self.tokens[b], self.kept[b], self.kept_allowed[b] = row, [], [], []
            row.stats.count_policy(1, len(row.prefix))
        self.active = self.active + [b for b, _ in new]
        self._trim_left()

    def _trim_left(self) -> None:
        """Drop the leading cache columns no active row attends to.

        why: rows leave and join a long-running batch; without this the padding columns of rows long gone stay in
        every layer, and each step pays for them. Positions are per row (:attr:`last_position`), so nothing shifts.
        """
        assert self.cache is not None and self.mask is not None
        first = int(self.mask.any(0).nonzero()[0])
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        kv.trim_left(self.cache, first)

    def step(self) -> list[tuple[int, Rollout | Exception]]:
        """Sample one token for every active row, then encode one chunk of the row being prefilled with the fewest
        tokens left; the rows that finished, with their rollouts, and the rows whose own work failed (their grammar
        allows no token, ...), with the error: those leave the batch, the others go on."""
        done = self._decode() if self.active else []
        if self.prefilling:
            done.extend(self._prefill())
        return done

    def _prefill(self) -> list[tuple[int, Rollout | Exception]]:
        """Encode the next chunk of the row being prefilled with the fewest tokens left (a cancelled one leaves); join
        it once whole. why fewest left: a short prompt behind a long one joins after its own few chunks."""
        first = min(self.prefilling, key=lambda p: len(p.row.prefix) - p.encoded)
        if self.keep_going is not None and not self.keep_going(first.b):
            self.prefilling.remove(first)
            return [(first.b, self._empty_rollout(first.row, "cancelled"))]
        assert self.prefill_chunk is not None
        try:
            logits = first.advance(self.policy, self.prefill_chunk)
        except Exception as err:  # why: the row's own prefill failed: it leaves, the others go on
            self.prefilling.remove(first)
            return [(first.b, err)]
        if logits is not None:
            n = len(first.row.prefix)
            mask = torch.ones(1, n, dtype=torch.long, device=self.policy.device)
            self._join([(first.b, first.row)], first.cache, mask, torch.arange(n, device=self.policy.device)[None], logits)
            self.prefilling.remove(first)
        return []

    def _decode(self) -> list[tuple[int, Rollout | Exception]]:
        """Sample one token for every active row (see :meth:`step`)."""
        policy, rows = self.policy, self.rows
        assert self.cache is not None and self.mask is not None and self.last_position is not None and self.logits is not None
        logits, active = self.logits, self.active
        failed: dict[int, Exception] = {}
        allowed = [self._allowed(b, row, failed) for row, b in enumerate(active)]  # per row: [V] or None
        generators = [rows[b].draw_generator(len(rows[b].committed) + len(self.tokens[b]), policy.device) for b in active]
        step = sample(_masked_rows(logits, allowed), self.sampling, generators)
        tokens = step.tolist()  # why: one copy to the host for the batch, not one a row
        keep_rows: list[int] = []
        done: list[tuple[int, Rollout | Exception]] = []
        for row, b in enumerate(active):
            token = tokens[row]
            grammar = rows[b].grammar
            if self.keep_going is not None and not self.keep_going(b):
                reason: str | None = "cancelled"
            else:
                try:
                    if row in failed:
                        raise failed[row]
                    if grammar is not None:
                        grammar.accept([token])
                    reason = _finish(policy, token, self.tokens[b], rows[b])
                except Exception as err:  # why: the row's own work failed (its grammar): it leaves, the others go on
                    self._forget(b)
                    done.append((b, err))
                    continue
            if reason not in ("eos", "cancelled"):
                self.tokens[b].append(token)
                rows[b].stats.rollout_tokens += 1
                if self.on_token is not None:
                    self.on_token(b, token)
                if self.keep_logits:
                    self.kept[b].append(logits[row])
                    if allowed[row] is not None:
                        self.kept_allowed[b].append(allowed[row])  # type: ignore[arg-type]
            if reason is None:
                keep_rows.append(row)
            else:
                done.append((b, self._close(b, reason, grammar is not None, row)))
        if not keep_rows:
            self.active, self.cache, self.mask, self.last_position, self.logits = [], None, None, None, None
            return done
        mask, positions = self.mask, self.last_position
        if len(keep_rows) < len(active):  # drop finished rows from the batch and the cache
            index = torch.tensor(keep_rows, device=policy.device)
            kv.select_rows(self.cache, index)
            mask, positions, step = mask[index], positions[index], step[index]
            active = [active[r] for r in keep_rows]
            self.mask = mask
            self._trim_left()
            mask = self.mask
        self.mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        self.last_position = positions + 1
        out = policy.model(input_ids=step[:, None], attention_mask=self.mask, position_ids=self.last_position, cache=self.cache, use_cache=True)
        for b in active:
            rows[b].stats.count_policy(1, 1)
        self.active, self.logits = active, out.logits[:, -1].float()
        return done

    def _allowed(self, b: int, row: int, failed: dict[int, Exception]) -> torch.Tensor | None:
        """Row ``b``'s grammar mask ([V] bool; None: free text, or the grammar failed, which goes in ``failed[row]``)."""
        grammar = self.rows[b].grammar
        if grammar is None:
            return None
        try:
            return grammar.allowed()
        except Exception as err:
            failed[row] = err
            return None

    def _forget(self, b: int) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Drop row ``b``'s bookkeeping; its tokens, kept logits and kept masks."""
        del self.rows[b]
        return self.tokens.pop(b), self.kept.pop(b), self.kept_allowed.pop(b)

    def _empty_rollout(self, row: RolloutRow, reason: str) -> Rollout:
        """A rollout of no tokens (its logits and, for a grammar's row, its masks empty too)."""
        vocab = self.policy.vocab_size
        masks = torch.empty(0, vocab, dtype=torch.bool) if self.keep_logits and row.grammar is not None else None
        return Rollout([], torch.empty(0, vocab) if self.keep_logits else None, reason, masks)

    def _close(self, b: int, reason: str, constrained: bool, row: int) -> Rollout:
        """Row ``b``'s rollout (``row``: its index in the batch's cache); the batch forgets the row."""
        cache = self._row_cache(b, row) if self.rows[b].keep_cache else None
        tokens, kept, kept_allowed = self._forget(b)
        vocab = self.policy.vocab_size
        stacked = torch.stack(kept) if kept else torch.empty(0, vocab)
        masks = None
        if self.keep_logits and constrained:
            masks = torch.stack(kept_allowed) if kept_allowed else torch.empty(0, vocab, dtype=torch.bool)
        return Rollout(tokens, stacked if self.keep_logits else None, reason, masks, cache)

    def _row_cache(self, b: int, row: int) -> RowCache:
        """Row ``b``'s entries of the batch's cache, copied: its real columns are the last ones (rows are left-padded)."""
        assert self.cache is not None and self.mask is not None
        n = int(self.mask[row].sum())
        return RowCache((self.rows[b].prefix + self.tokens[b])[:n], kv.copy_row(self.cache, row, n))


class _Prefill:
    """A row whose prefix is encoded a chunk at a time (:attr:`RolloutBatch.prefill_chunk`), and its cache so far."""

    def __init__(self, b: int, row: RolloutRow) -> None:
        self.b, self.row = b, row
        self.cache = kv.empty()
        self.encoded = 0
        """Tokens of the prefix in :attr:`cache`."""

    def advance(self, policy: Policy, chunk: int) -> torch.Tensor | None:
        """Encode the next ``chunk`` tokens; the next token's logits ([1, V]) once the whole prefix is encoded."""
        prefix, start = self.row.prefix, self.encoded
        end = min(start + chunk, len(prefix))
        ids = torch.tensor([prefix[start:end]], device=policy.device)
        mask = torch.ones(1, end, dtype=torch.long, device=policy.device)
        positions = torch.arange(start, end, device=policy.device)[None]
        out = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True)
        self.encoded = end
        return out.logits[:, -1].float() if end == len(prefix) else None


def _masked_rows(logits: torch.Tensor, allowed: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The logits to sample from: each row with a grammar mask under it. logits: [B, V]."""
    if all(a is None for a in allowed):
        return logits
    rows = [masked(logits[i], a.to(logits.device)) if a is not None else logits[i] for i, a in enumerate(allowed)]
    return torch.stack(rows)


def _finish(policy: Policy, token: int, tokens: list[int], row: RolloutRow) -> str | None:
    """Why a row ends after sampling ``token`` (None: it goes on): the request's stop strings are looked for over
    ``committed`` and the row's tokens, its ``own_stop`` strings over its tokens only."""
    if token in policy.eos_ids:
        return "eos"
    if _completes(policy, [*row.committed, *tokens, token], row.stop) or _completes(policy, [*tokens, token], row.own_stop):
        return "stop"
    if len(tokens) + 1 >= row.budget:
        return "length"
    return None


def _completes(policy: Policy, ids: list[int], stop: Sequence[str]) -> bool:
    """Whether a stop string occurs in the text of the last few ``ids`` (the ones the newest token can complete one in).

    Why only the last few: decoding them keeps each step O(1) instead of O(response). A miss only lets the row run
    on: the final text is cut in full."""
    if not stop:
        return False
    window = 2 * max(len(s) for s in stop) + 8
    return cut_at_stop(policy.decode(ids[-window:]), stop)[1]
