"""∇-Reasoner decoding (Alg. 3): per position, probe → DTO → propose → accept, with rollout reuse; the proposals of
several positions may roll out together (``NablaConfig.proposal_window``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Generator, Literal, Sequence

import torch

from ..config import NablaConfig
from ..rewards.base import RewardAdapter, RewardPrefix, rank
from .accounting import Stats
from .constraints import Grammar, masked
from .dto import DTORun, NonFiniteGradient, Pass, PassRequest, PolicyPrefix, PrefixEncoder, ProbePass, kl_rows
from .policy import Policy
from .rollout import Rollout, RolloutRow, Sampling, differ_chance, keyed_generator, sample
from .scoring import ScoreRequest
from .stream import TextStream
from .trace import PositionRecord

log = logging.getLogger(__name__)

@dataclass
class Decoded:
    """What the decoder produced for one request."""

    tokens: list[int]
    finish_reason: str
    reward: float | None
    trace: list[PositionRecord]


Steps = Generator["list[RolloutRow] | PassRequest | ScoreRequest", "list[Rollout] | Pass | list[float]", Decoded]
"""A decoding in progress: yields the rollouts (several at once), the DTO pass or the scoring it needs, is sent their
results (a pass's :class:`NonFiniteGradient` is thrown in), returns what it decoded."""


def entropy(logits: torch.Tensor) -> float:
    """Entropy (nats) of softmax(logits). logits: [V]."""
    logp = logits.float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum())


def proposal_sampling(config: NablaConfig) -> Sampling:
    """The distribution a proposal is resampled from: softmax(z̃/τ) within the top-p nucleus."""
    return Sampling(config.tau, config.top_p)


def gate(logits: torch.Tensor, token: int, h: float, config: NablaConfig) -> Literal["entropy", "differ"] | None:
    """Why a position is committed without a probe, or None when it gets one. logits: [V]; h: their entropy.

    ``entropy``: h is at most ε_ent; ``differ``: a proposal would repeat ``token`` but for a chance of at most
    ``differ_threshold`` (a gate that is off at 0).
    """
    if h <= config.entropy_threshold:
        return "entropy"
    if config.differ_threshold > 0 and differ_chance(logits, token, proposal_sampling(config)) <= config.differ_threshold:
        return "differ"
    return None


def top_tokens(policy: Policy, logits: torch.Tensor, tau: float, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely tokens of softmax(logits/τ) with their probabilities."""
    probs = (logits.float() / tau).softmax(-1)
    values, ids = probs.topk(k)
    return [(policy.token_text(int(i)), float(v)) for v, i in zip(values, ids)]


class Decoder:
    """Decodes one request with ∇-Reasoner (a reward without gradients leaves DTO the likelihood term only).

    :meth:`steps` hands out the rollouts, DTO passes and scorings it needs, so :func:`~nabla_lc.engine.calls.gather`
    can batch those of many requests.
    """

    def __init__(
        self,
        policy: Policy,
        reward: RewardAdapter,
        config: NablaConfig,
        stats: Stats,
        generator: torch.Generator | None,
        stream: TextStream,
        grammar: Grammar | None = None,
    ) -> None:
        self.policy, self.reward, self.config = policy, reward, config
        self.stats, self.generator, self.stream = stats, generator, stream
        self.grammar = grammar
        """The constraint's parse state after the committed tokens (None: free text)."""
        self.committed: list[int] = []
        self.trace: list[PositionRecord] = []
        self.reward_value: float | None = None
        self.prefixes = PrefixEncoder(policy, reward, config, stats)
        self.probe_pass: ProbePass | None = None
        self.noise = _draw_key(generator) if config.coupled_rollouts else None
        """The rollouts' shared randomness (``NablaConfig.coupled_rollouts``), drawn once from the request's generator."""
        self.key = _draw_key(generator) if config.proposal_window > 1 else None
        """The key of the proposals' and rollouts' draws with a window of 2 or more (:meth:`draws`), drawn once."""

    def steps(self, prompt_ids: Sequence[int], reward_prompt: str, max_new_tokens: int) -> Steps:
        """Decode until the rollout ends, searching while the rollout budget lasts; driven by
        :func:`~nabla_lc.engine.calls.gather`."""
        self.prompt_ids, self.reward_prompt, self.max_new_tokens = list(prompt_ids), reward_prompt, max_new_tokens
        self.stats.rollouts += 1
        (current,) = yield [self.row([], self.generator)]
        while current.tokens:
            if self.stats.rollouts >= self.config.n:  # budget spent: the current rollout is the plain decode
                current = self.commit(current, len(current.tokens))
                break
            current = yield from self.window(current)
        return Decoded(self.committed, current.finish_reason, self.reward_value, self.trace)

    def row(self, head: list[int], generator: torch.Generator | None) -> RolloutRow:
        """The rollout of prefix + ``head`` to wait on, drawing from ``generator`` (the caller counts it)."""
        done = self.committed + head
        grammar = self.grammar.fork(head) if self.grammar is not None else None
        keep_cache = self.config.prefix_cache and self.config.dto_steps > 0  # why: DTO's prefixes come from the rollout's cache
        return RolloutRow(
            self.prompt_ids + done, done, self.max_new_tokens - len(done), self.stream.stop, generator, self.stats, grammar,
            noise=self.noise, keep_cache=keep_cache,
        )

    def draws(self, kind: Literal["proposal", "rollout"], index: int) -> torch.Generator | None:
        """The generator of the proposal at response position ``index``, or of the rollout from it: the request's own
        (drawn in decoding order), or with a window of 2 or more one keyed by the request and the position, so that
        no draw depends on how much was decoded ahead."""
        return self.generator if self.key is None else keyed_generator(f"{self.key}:{kind}:{index}", self.policy.device)

    def commit(self, current: Rollout, k: int) -> Rollout:
        """Commit the rollout's first k tokens; its suffix is reused from the next position."""
        head = current.tokens[:k]
        self.committed.extend(head)
        self.stream.push(head)
        if self.grammar is not None:
            self.grammar.accept(head)
        return current.drop(k)

    def window(self, current: Rollout) -> Steps:
        """Walk the current rollout up to ``proposal_window`` proposals (or the budget), roll their continuations out
        in one batch, score them in one pass, then apply the positions in order: the first accepted proposal wins and
        what was walked after it is discarded (its passes still counted). With a window of 1 this is Alg. 3's
        probe → DTO → propose → accept at each position."""
        walked: list[Walked] = []
        proposed: list[Walked] = []
        rollouts = 0
        for k in range(len(current.tokens)):
            if self.stats.rollouts + rollouts >= self.config.n:  # the budget is spent if every proposal so far fails
                break
            found = yield from self.walk(current, k)
            walked.append(found)
            if found.proposal is not None:
                proposed.append(found)
                rollouts += found.proposal not in self.policy.eos_ids
                if len(proposed) == self.config.proposal_window:
                    break
        if not proposed:
            return self.apply(current, walked, {}, [])
        candidates = yield from self.continuations(current, proposed)
        # why: every full response goes through one batched pass, so they are scored alike; with the prefix cache,
        # after the reward prefix DTO encoded (the reward encodes only what follows it)
        prefix = self.prefixes.reward_prefix if self.config.prefix_cache else None
        responses = [self.committed + current.tokens] + [self.committed + current.tokens[: w.offset] + candidates[w.offset].tokens for w in proposed]
        scores = yield ScoreRequest(self.reward, self.reward_prompt, responses, self.stats, prefix)
        return self.apply(current, walked, candidates, scores)

    def walk(self, current: Rollout, k: int) -> Generator[PassRequest, Pass, "Walked"]:
        """The rollout's position k (gates, probe, DTO, proposal) as if every proposal before it were rejected; its
        counters go to the result's own :class:`Stats`, added to the request's once the position is applied."""
        assert current.logits is not None
        stats = Stats()
        index = len(self.committed) + k
        z1, original = current.logits[k], current.tokens[k]
        allowed = current.allowed[k] if current.allowed is not None else None  # the grammar's mask here: [V] or None
        within = masked(z1, allowed) if allowed is not None else z1  # why: a token the grammar forces has entropy 0
        h = entropy(within)
        skip = gate(within, original, h, self.config)
        if skip == "entropy":
            stats.skipped_entropy += 1
            return Walked(k, None, stats, None)
        if skip == "differ":
            stats.skipped_differ += 1
            return Walked(k, None, stats, None)
        record = PositionRecord(index, original, self.policy.token_text(original), h, float("nan"))
        if self.config.dto_steps > 0:
            optimized = yield from self.optimize(current, k, record, stats)
            if optimized is None:
                return Walked(k, record, stats, None)
            record.kl = float(kl_rows(optimized[None], z1[None].float(), self.config.tau)[0])
            within = masked(optimized, allowed) if allowed is not None else optimized
        proposal = int(sample(within[None], proposal_sampling(self.config), [self.draws("proposal", index)])[0])  # under the grammar's mask
        return Walked(k, record, stats, proposal if proposal != original else None)

    def optimize(self, current: Rollout, k: int, record: PositionRecord, stats: Stats) -> Generator[PassRequest, Pass, torch.Tensor | None]:
        """Probe, then DTO, at the rollout's position k; the optimized logits there, or None when it is skipped."""
        assert current.logits is not None
        done = self.committed + current.tokens[:k]
        run = DTORun(
            self.policy,
            self.reward,
            self.config,
            self.reward_prompt,
            self.prompt_ids + done,
            done,
            current.tokens[k:],
            current.logits[k:],
            stats,
            prefixes=partial(self.extend_prefixes, current, done),  # why: called only when a pass runs, so a reused probe encodes nothing
        )
        try:
            record.grad_norm = yield from run.probe_steps(self.probe_pass)
            record.probe_reused = run.probe_reused
            if self.config.probe_reuse:
                self.probe_pass = run.probe_pass
            if record.grad_norm <= self.config.grad_threshold:
                stats.skipped_gradient += 1
                return None
            z = yield from run.optimize_steps()
        except NonFiniteGradient as err:  # documented fallback: commit the rollout's token unchanged
            log.warning("position %d: %s; keeping the rollout's token", record.index, err)
            stats.nonfinite_gradients += 1
            return None
        record.optimized, record.steps, record.cache_hits = True, run.steps, run.cache_hits
        record.loss_start, record.loss_end = run.loss_start, run.loss_end
        record.top_after = top_tokens(self.policy, z[0], self.config.tau)
        return z[0]

    def extend_prefixes(self, current: Rollout, done: list[int]) -> tuple[PolicyPrefix, RewardPrefix | None]:
        """The encoded prompt + ``done`` (committed tokens and the rollout's before the position). The policy's are the
        first entries of the KV cache of the rollout ``current`` is what is left of (the same tokens at the same
        positions; no pass), else encoded (only the tokens since the last call); the reward's are encoded (only those)."""
        ids = self.prompt_ids + done
        cached = None
        if current.cache is not None and current.logits is not None and len(current.logits) and current.cache.ids[: len(ids)] == ids:
            cached = (current.cache.head(len(ids)), current.logits[len(done) - len(self.committed)])
        return self.prefixes.encode(self.reward_prompt, ids, done, cached)

    def continuations(self, current: Rollout, proposed: list["Walked"]) -> Generator[list[RolloutRow], list[Rollout], dict[int, Rollout]]:
        """Each proposal's full continuation (the proposal and its rollout), by offset; an end-of-sequence proposal has
        nothing to roll out."""
        assert current.logits is not None
        rolled = [w for w in proposed if w.proposal not in self.policy.eos_ids]
        rows = [self.row(current.tokens[: w.offset] + [w.proposal], self.draws("rollout", len(self.committed) + w.offset)) for w in rolled]  # type: ignore[list-item]
        new = dict(zip([w.offset for w in rolled], (yield rows) if rows else []))
        candidates = {}
        for w in proposed:
            k, first = w.offset, current.logits[w.offset : w.offset + 1]
            first_allowed = current.allowed[k : k + 1] if current.allowed is not None else None
            if w.offset not in new:  # the proposal ends the response
                candidates[k] = Rollout([], first[:0], "eos", first_allowed[:0] if first_allowed is not None else None)
                continue
            out = new[k]
            assert out.logits is not None
            allowed = torch.cat([first_allowed, out.allowed]) if first_allowed is not None and out.allowed is not None else None
            candidates[k] = Rollout([w.proposal, *out.tokens], torch.cat([first, out.logits]), out.finish_reason, allowed, out.cache)  # type: ignore[list-item]
        return candidates

    def apply(self, current: Rollout, walked: list["Walked"], candidates: dict[int, Rollout], scores: list[float]) -> Rollout:
        """Apply the walked positions in order, committing one token each: a proposal is kept only if its full response
        scores strictly higher than the current one; after a kept proposal the rest is discarded, its passes counted."""
        r_current = scores[0] if scores else None
        proposals = 0
        for n, w in enumerate(walked):
            self.stats.add(w.stats)
            self.stats.positions += 1
            if w.record is not None and self.config.trace:
                self.trace.append(w.record)
            if w.proposal is None:
                current = self.commit(current, 1)
                continue
            assert w.record is not None and r_current is not None
            proposals += 1
            self.stats.proposals += 1
            self.stats.rollouts += w.proposal not in self.policy.eos_ids
            record, r_proposal = w.record, scores[proposals]
            record.proposed_token, record.proposed_text = w.proposal, self.policy.token_text(w.proposal)
            record.reward_current, record.reward_proposal = r_current, r_proposal
            record.accepted = rank(r_proposal) > rank(r_current)
            if record.accepted:
                self.reward_value = r_proposal
                for rest in walked[n + 1 :]:
                    self.stats.add_work(rest.stats)
                return self.commit(candidates[w.offset], 1)
            self.stats.rejections += 1
            self.reward_value = r_current
            current = self.commit(current, 1)
        return current


def _draw_key(generator: torch.Generator | None) -> int:
    """One integer drawn from the request's generator (on its device: a CUDA generator draws on CUDA only)."""
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator is not None else None))


@dataclass
class Walked:
    """A position of the current rollout, walked before its outcome is applied (:meth:`Decoder.window`)."""

    offset: int
    """Its index in the current rollout."""
    record: PositionRecord | None
    """Its trace record (None: committed by a gate before its probe)."""
    stats: Stats
    """Its counters: the gate, probe and DTO run, their passes."""
    proposal: int | None
    """The proposed token (None: the rollout's token is kept without a comparison)."""
