"""∇-Reasoner decoding (Alg. 3): per position, probe → DTO → propose → accept, with rollout reuse."""

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
from .dto import DTORun, NonFiniteGradient, Pass, PassCall, PassRequest, PolicyPrefix, PrefixEncoder, ProbePass, kl_rows
from .policy import Policy
from .rollout import Job, Rollout, RolloutCall, RolloutRow, Sampling, differ_chance, run_alone, sample
from .scoring import ScoreCall, ScoreRequest
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


Steps = Generator["RolloutRow | PassRequest | ScoreRequest", "Rollout | Pass | list[float]", Decoded]
"""A decoding in progress: yields each rollout, DTO pass or scoring it needs, is sent its result (a pass's
:class:`NonFiniteGradient` is thrown in), returns what it decoded."""


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

    :meth:`steps` hands out the rollouts, DTO passes and scorings it needs, so :func:`decode_steps` can batch those
    of many requests.
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
        self.noise = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator is not None else None)) if config.coupled_rollouts else None
        """The rollouts' shared randomness (``NablaConfig.coupled_rollouts``), drawn once from the request's generator."""

    def steps(self, prompt_ids: Sequence[int], reward_prompt: str, max_new_tokens: int) -> Steps:
        """Decode until the rollout ends, searching while the rollout budget lasts; driven by :func:`decode_steps`."""
        self.prompt_ids, self.reward_prompt, self.max_new_tokens = list(prompt_ids), reward_prompt, max_new_tokens
        current = yield self.rollout([])
        while current.tokens:
            if self.stats.rollouts >= self.config.n:  # budget spent: the current rollout is the plain decode
                current = self.commit(current, len(current.tokens))
                break
            current = yield from self.position(current)
        return Decoded(self.committed, current.finish_reason, self.reward_value, self.trace)

    def rollout(self, head: list[int]) -> RolloutRow:
        """The rollout of prefix + ``head`` to wait on (counted against the budget)."""
        self.stats.rollouts += 1
        done = self.committed + head
        grammar = self.grammar.fork(head) if self.grammar is not None else None
        keep_cache = self.config.prefix_cache and self.config.dto_steps > 0  # why: DTO's prefixes come from the rollout's cache
        return RolloutRow(
            self.prompt_ids + done, done, self.max_new_tokens - len(done), self.stream.stop, self.generator, self.stats, grammar,
            noise=self.noise, keep_cache=keep_cache,
        )

    def commit(self, current: Rollout, k: int) -> Rollout:
        """Commit the rollout's first k tokens; its suffix is reused from the next position."""
        head = current.tokens[:k]
        self.committed.extend(head)
        self.stream.push(head)
        if self.grammar is not None:
            self.grammar.accept(head)
        return current.drop(k)

    def position(self, current: Rollout) -> Steps:
        """One position: select, optimize, propose, accept; commits exactly one token."""
        assert current.logits is not None
        self.stats.positions += 1
        index = len(self.committed)
        z1, original = current.logits[0], current.tokens[0]
        allowed = current.allowed[0] if current.allowed is not None else None  # the grammar's mask here: [V] or None
        within = masked(z1, allowed) if allowed is not None else z1  # why: a token the grammar forces has entropy 0
        h = entropy(within)
        skip = gate(within, original, h, self.config)
        if skip == "entropy":
            self.stats.skipped_entropy += 1
            return self.commit(current, 1)
        if skip == "differ":
            self.stats.skipped_differ += 1
            return self.commit(current, 1)
        record = PositionRecord(index, original, self.policy.token_text(original), h, float("nan"))
        if self.config.trace:
            self.trace.append(record)
        if self.config.dto_steps > 0:
            optimized = yield from self.optimize(current, record)
            if optimized is None:
                return self.commit(current, 1)
            record.kl = float(kl_rows(optimized[None], z1[None].float(), self.config.tau)[0])
            within = masked(optimized, allowed) if allowed is not None else optimized
        proposal = int(sample(within[None], proposal_sampling(self.config), [self.generator])[0])  # under the grammar's mask
        if proposal == original:
            return self.commit(current, 1)
        return self.commit((yield from self.compare(current, proposal, record)), 1)

    def optimize(self, current: Rollout, record: PositionRecord) -> Generator[PassRequest, Pass, torch.Tensor | None]:
        """Probe, then DTO; the optimized first-position logits, or None when the position is skipped."""
        assert current.logits is not None
        run = DTORun(
            self.policy,
            self.reward,
            self.config,
            self.reward_prompt,
            self.prompt_ids + self.committed,
            self.committed,
            current.tokens,
            current.logits,
            self.stats,
            prefixes=partial(self.extend_prefixes, current),  # why: called only when a pass runs, so a reused probe encodes nothing
        )
        try:
            record.grad_norm = yield from run.probe_steps(self.probe_pass)
            record.probe_reused = run.probe_reused
            if self.config.probe_reuse:
                self.probe_pass = run.probe_pass
            if record.grad_norm <= self.config.grad_threshold:
                self.stats.skipped_gradient += 1
                return None
            z = yield from run.optimize_steps()
        except NonFiniteGradient as err:  # documented fallback: commit the rollout's token unchanged
            log.warning("position %d: %s; keeping the rollout's token", record.index, err)
            self.stats.nonfinite_gradients += 1
            return None
        record.optimized, record.steps, record.cache_hits = True, run.steps, run.cache_hits
        record.loss_start, record.loss_end = run.loss_start, run.loss_end
        record.top_after = top_tokens(self.policy, z[0], self.config.tau)
        return z[0]

    def extend_prefixes(self, current: Rollout) -> tuple[PolicyPrefix, RewardPrefix | None]:
        """The encoded prompt + committed tokens. The policy's are the first entries of the KV cache that the rollout
        ``current`` is what is left of (the same tokens at the same positions; no pass), else encoded (only the
        tokens committed since the last call); the reward's are encoded (only those)."""
        ids = self.prompt_ids + self.committed
        cached = None
        if current.cache is not None and current.logits is not None and len(current.logits) and current.cache.ids[: len(ids)] == ids:
            cached = (current.cache.head(len(ids)), current.logits[0])
        return self.prefixes.encode(self.reward_prompt, ids, self.committed, cached)

    def compare(self, current: Rollout, proposal: int, record: PositionRecord) -> Generator[RolloutRow | ScoreRequest, Rollout | list[float], Rollout]:
        """Roll out from the proposal and keep it only if its full response scores strictly higher."""
        assert current.logits is not None
        self.stats.proposals += 1
        record.proposed_token, record.proposed_text = proposal, self.policy.token_text(proposal)
        if proposal in self.policy.eos_ids:  # the proposal ends the response: nothing to roll out
            candidate = Rollout([], current.logits[:0], "eos", current.allowed[:0] if current.allowed is not None else None)
        else:
            new = yield self.rollout([proposal])
            assert new.logits is not None
            allowed = torch.cat([current.allowed[:1], new.allowed]) if current.allowed is not None and new.allowed is not None else None
            candidate = Rollout([proposal, *new.tokens], torch.cat([current.logits[:1], new.logits]), new.finish_reason, allowed, new.cache)
        # why: both full responses go through one batched pass, so they are scored identically; with the prefix cache,
        # after the reward prefix DTO encoded (the reward encodes only what follows it)
        prefix = self.prefixes.reward_prefix if self.config.prefix_cache else None
        responses = [self.committed + current.tokens, self.committed + candidate.tokens]
        r_current, r_proposal = yield ScoreRequest(self.reward, self.reward_prompt, responses, self.stats, prefix)
        record.reward_current, record.reward_proposal = r_current, r_proposal
        record.accepted = rank(r_proposal) > rank(r_current)
        if record.accepted:
            self.reward_value = r_proposal
            return candidate
        self.stats.rejections += 1
        self.reward_value = r_current
        return current


def decode_steps(sampling: Sampling, decodings: Sequence[Steps]) -> Job[list[Decoded]]:
    """Run decodings side by side, as a job: the DTO passes they wait on at the same time form one call, and so do
    the scorings and the rollouts.

    Each decoding runs its own positions until it needs a pass, a scoring or a rollout. The waiting passes and
    scorings are run first (each kind together), until every decoding waits on a rollout or is done; then the
    waiting rollouts are sampled together, each row with its own generator and statistics.
    """
    done: dict[int, Decoded] = {}
    waiting: dict[int, RolloutRow | PassRequest | ScoreRequest] = {}

    def advance(i: int, result: Rollout | Pass | list[float] | NonFiniteGradient | None) -> None:
        try:
            if isinstance(result, NonFiniteGradient):
                waiting[i] = decodings[i].throw(result)
            else:
                waiting[i] = decodings[i].send(result)  # type: ignore[arg-type]  # why: a generator starts on None
        except StopIteration as finished:
            done[i] = finished.value

    for i in range(len(decodings)):
        advance(i, None)
    while waiting:
        passes = [(i, w) for i, w in sorted(waiting.items()) if isinstance(w, PassRequest)]
        scorings = [(i, w) for i, w in sorted(waiting.items()) if isinstance(w, ScoreRequest)]
        if passes or scorings:
            ready = passes or scorings
            for i, _ in ready:
                del waiting[i]
            found = yield PassCall([w for _, w in passes]) if passes else ScoreCall([w for _, w in scorings])  # type: ignore[misc]
            for (i, _), result in zip(ready, found):
                advance(i, result)
            continue
        calls = sorted(waiting.items())  # why: rows in request order, however the passes reordered the waiting
        waiting.clear()
        rollouts = yield RolloutCall([c for _, c in calls], sampling, keep_logits=True)  # type: ignore[misc]
        for (i, _), result in zip(calls, rollouts):
            advance(i, result)  # type: ignore[arg-type]
    return [done[i] for i in range(len(decodings))]


def decode_together(policy: Policy, sampling: Sampling, decodings: Sequence[Steps]) -> list[Decoded]:
    """:func:`decode_steps` driven by itself (each call run at once)."""
    return run_alone(policy, decode_steps(sampling, decodings))
