"""Differentiable Textual Optimization: gradient descent on a rollout's logits.

z is an fp32 parameter (even for a bf16 policy) so that steps of 0.01 are not rounded away.
The forward pass sees hard one-hots of argmax(z); the backward pass goes through softmax(z/τ)
(straight-through). Because the forward value depends only on the hard tokens, dL/dy is exactly
reusable while the argmax is unchanged: the step then costs no model pass (gradient caching).
For the same reason a probe's pass serves every later position of an unchanged rollout (probe reuse).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Generator, NamedTuple, Sequence, TypeVar

import torch

from .. import kv
from ..config import NablaConfig
from ..numerics import upcast
from ..rewards.base import RewardAdapter, RewardPrefix, SoftScore, checked_soft
from ..tensors import pad_rows
from .accounting import Stats
from .policy import Policy

log = logging.getLogger(__name__)

PIN_MARGIN = 1e-3
"""How far above the row's max a sampled (non-argmax) rollout token starts, in the hard choice only."""

PASS_ROWS = 8
"""Most DTO passes (rows, one per decoding) in one batched pass of a model: a batched pass holds [rows, max L, V]
logits and their gradients, so :func:`run_passes` runs more as several batched passes of at most this many rows."""


class NonFiniteGradient(RuntimeError):
    """A DTO pass produced NaN or infinite gradients."""


class _OneHotEmbed(torch.autograd.Function):
    """E[hard] forward, dL/dy = dL/de @ E^T backward: y @ E without the [L, V] x [V, H] product.

    Exact because y is a one-hot of ``hard`` in the forward pass.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, hard: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(embedding)
        return embedding[hard]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (embedding,) = ctx.saved_tensors
        return grad.to(embedding.dtype) @ embedding.T, None, None


def embed(y: torch.Tensor, embedding: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """Token vectors to input embeddings. y: [L, V] -> [L, H]; pass ``hard`` when y is its one-hot."""
    if hard is not None:
        return _OneHotEmbed.apply(y, hard, embedding)
    return y.to(embedding.dtype) @ embedding


@dataclass
class PolicyPrefix:
    """The prompt and committed tokens, encoded once and extended as the decoder commits tokens."""

    ids: list[int]
    cache: kv.Cache | None
    """KV cache of ``ids`` (None when prefix reuse is off)."""
    next_logp: torch.Tensor
    """[V] fp32 log π(· | prefix), which scores the rollout's first token."""
    snapshot: kv.Snapshot | None
    """The prefix's entries of ``cache``, put back after every step."""


@torch.no_grad()
def encode_prefix(policy: Policy, ids: Sequence[int], stats: Stats, keep_cache: bool = True) -> PolicyPrefix:
    """One forward pass over the prefix; its cache serves every DTO step of the run."""
    cache = kv.empty() if keep_cache else None
    x = torch.tensor([list(ids)], device=policy.device)
    out = policy.model(input_ids=x, cache=cache, use_cache=keep_cache)
    stats.count_policy(1, len(ids))
    snapshot = kv.Snapshot.take(cache) if cache is not None else None
    return PolicyPrefix(list(ids), cache, upcast(out.logits[0, -1]).log_softmax(-1), snapshot)


@torch.no_grad()
def extend_prefix(policy: Policy, prefix: PolicyPrefix, ids: Sequence[int], stats: Stats) -> PolicyPrefix:
    """The prefix for ``ids``, which extend ``prefix.ids``: only the new tokens are encoded, on its cache."""
    ids = list(ids)
    P = len(prefix.ids)
    if prefix.cache is None or ids[:P] != prefix.ids:
        return encode_prefix(policy, ids, stats, keep_cache=prefix.cache is not None)
    if len(ids) == P:
        return prefix
    x = torch.tensor([ids[P:]], device=policy.device)
    positions = torch.arange(P, len(ids), device=policy.device)[None]
    out = policy.model(input_ids=x, position_ids=positions, cache=prefix.cache, use_cache=True)
    stats.count_policy(1, len(ids) - P)
    return PolicyPrefix(ids, prefix.cache, upcast(out.logits[0, -1]).log_softmax(-1), kv.Snapshot.take(prefix.cache))


def gradient_reward(reward: RewardAdapter | None, config: NablaConfig) -> RewardAdapter | None:
    """The reward DTO differentiates: None when it has no gradients or λ is 0 (the likelihood term alone)."""
    return reward if (reward is not None and reward.differentiable and config.reward_weight > 0) else None


class PrefixEncoder:
    """The prompt + committed tokens of one request, encoded for the policy and the gradient reward.

    Each call encodes only the tokens committed since the last one (with ``prefix_cache`` off, everything afresh), or,
    for the policy, takes them from a rollout's cache.
    """

    def __init__(self, policy: Policy, reward: RewardAdapter | None, config: NablaConfig, stats: Stats) -> None:
        self.policy, self.config, self.stats = policy, config, stats
        self.reward = gradient_reward(reward, config)
        self.prefix: PolicyPrefix | None = None
        self.reward_prefix: RewardPrefix | None = None
        self.reward_committed: list[int] = []
        """The committed tokens :attr:`reward_prefix` encodes."""

    def encode(
        self, reward_prompt: str, prefix_ids: Sequence[int], committed: Sequence[int], cached: tuple[kv.Cache, torch.Tensor] | None = None
    ) -> tuple[PolicyPrefix, RewardPrefix | None]:
        """The prefixes for ``prefix_ids`` (prompt + ``committed``), extending the previous call's.

        ``cached``: the policy's KV cache of ``prefix_ids`` and its logits for the next token ([V], raw), as a rollout
        of them left them; the policy's prefix is then taken from it, with no pass (with ``prefix_cache`` on)."""
        if cached is not None and self.config.prefix_cache:
            cache, logits = cached
            self.prefix = PolicyPrefix(list(prefix_ids), cache, upcast(logits).log_softmax(-1), kv.Snapshot.take(cache))
        elif self.prefix is None or not self.config.prefix_cache:
            self.prefix = encode_prefix(self.policy, prefix_ids, self.stats, keep_cache=self.config.prefix_cache)
        else:
            self.prefix = extend_prefix(self.policy, self.prefix, prefix_ids, self.stats)
        if self.reward is not None:
            committed = list(committed)
            # why: a decoder that walked ahead of a proposal it then accepted asks for a shorter prefix: encode afresh
            ahead = committed[: len(self.reward_committed)] != self.reward_committed
            if self.reward_prefix is None or not self.config.prefix_cache or ahead:
                self.reward_prefix = self.reward.prepare(reward_prompt, committed)
            else:
                self.reward_prefix = self.reward.extend(self.reward_prefix, reward_prompt, committed)
            self.reward_committed = committed
            self.stats.count_reward(self.reward_prefix.passes, self.reward_prefix.tokens)
        return self.prefix, self.reward_prefix


def token_logprobs(policy: Policy, prefix: PolicyPrefix, y: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """y_t · log π(· | prefix, y_<t) per row, differentiable in y. y: [L, V] -> [L]; their sum is log π(y).

    With a prefix cache the pass covers the L rollout tokens only; the prefix's entries are put back after.
    """
    L = y.shape[0]
    emb = embed(y, policy.embedding, hard)[None]  # [1, L, H]
    P = len(prefix.ids)
    if prefix.snapshot is not None:
        positions = torch.arange(P, P + L, device=policy.device)[None]
        try:
            out = policy.model(inputs_embeds=emb, position_ids=positions, cache=prefix.cache, use_cache=True)
        finally:
            prefix.snapshot.restore()  # why: the next step reuses the prefix entries only, graph-free
        logits = out.logits[0]
    else:
        prefix_emb = policy.embedding[torch.tensor(prefix.ids, device=policy.device)][None]
        out = policy.model(inputs_embeds=torch.cat([prefix_emb, emb], dim=1), use_cache=False)
        logits = out.logits[0, P:]
    # why: the first row reads the prefix's log-probs; concatenating the [L, V] inputs would copy them twice
    first = (y[0] * prefix.next_logp).sum()[None]
    return torch.cat([first, (y[1:] * upcast(logits[:-1]).log_softmax(-1)).sum(-1)])


class Pass(NamedTuple):
    """One forward and backward pass of each model at hard one-hots."""

    loss: float
    grad: torch.Tensor
    """[L, V] dL/dy."""
    logp: torch.Tensor
    """[L] log π of each hard token (detached)."""


@dataclass
class ProbePass:
    """A probe's pass at a rollout's tokens, kept for the later positions of the same rollout.

    Exact: with the response unchanged, committing its first k tokens removes only their log-prob
    terms from L, which do not depend on later tokens, so dL/dy of the later tokens is the same.
    """

    response: list[int]
    """Committed + hard tokens at the pass; the pass's rows are its last tokens."""
    found: Pass

    def serves(self, committed: Sequence[int], hard: Sequence[int]) -> bool:
        """Whether this pass was taken on ``committed + hard``, with no committed token among its rows."""
        return len(hard) <= len(self.found.logp) and self.response == [*committed, *hard]

    def at(self, committed: int) -> Pass:
        """The pass as seen with the first ``committed`` tokens of the response committed."""
        loss, grad, logp = self.found
        k = committed - (len(self.response) - len(logp))  # rows now committed
        return Pass(loss + float(logp[:k].sum()), grad[k:], logp[k:])


Prefixes = Callable[[], "tuple[PolicyPrefix, RewardPrefix | None]"]
"""Returns the encoded prompt + committed tokens for the policy and the gradient reward (None without one)."""


def cosine_lr(step: int, steps: int, lr: float, min_lr: float) -> float:
    """lr at the first step, min_lr at the last."""
    if steps <= 1:
        return lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / (steps - 1)))


def kl_rows(z: torch.Tensor, base: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(z/τ) ‖ softmax(base/τ)) per row. z, base: [rows, V] -> [rows]."""
    return _kl_to(z, (base / tau).log_softmax(-1), tau)


def _kl_to(z: torch.Tensor, logq: torch.Tensor, tau: float) -> torch.Tensor:
    logp = (z / tau).log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def trust_region(z0: torch.Tensor, z1: torch.Tensor, tau: float, target_kl: float, iters: int = 40) -> torch.Tensor:
    """z0 + α·(z1 − z0), with α ≥ 0 per row such that KL(softmax(·/τ) ‖ softmax(z0/τ)) = target_kl. z0, z1: [rows, V].

    Along a fixed direction d the KL grows monotonically with α (its derivative is α·Var(d) under the moved
    distribution), so doubling then bisection finds α. A row that cannot reach the target (the direction
    saturates on a point mass, or is zero) takes the largest α tried.
    """
    d = z1 - z0
    logq = (z0 / tau).log_softmax(-1)  # why: the base distribution is the same at every trial α

    def kl(alpha: torch.Tensor) -> torch.Tensor:
        return _kl_to(z0 + alpha[:, None] * d, logq, tau)

    hi = torch.ones(z0.shape[0], device=z0.device)
    for _ in range(30):  # why: Adam moves each logit by about Σ lr ≈ 0.1, so α can be in the hundreds
        short = kl(hi) < target_kl
        if not bool(short.any()):
            break
        hi = torch.where(short, hi * 2, hi)
    lo = torch.zeros_like(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = kl(mid) > target_kl
        lo, hi = torch.where(over, lo, mid), torch.where(over, mid, hi)
    return z0 + ((lo + hi) / 2)[:, None] * d


def straight_through_grad(z: torch.Tensor, g: torch.Tensor, tau: float) -> torch.Tensor:
    """∂(g · softmax(z/τ))/∂z, row by row: (s ⊙ g − s (s · g)) / τ. z, g: [L, V]."""
    s = (z / tau).softmax(-1)
    # why: aten's fused softmax backward makes one pass over [L, V] instead of five
    return torch.ops.aten._softmax_backward_data(g.to(s.dtype), s, -1, s.dtype).div_(tau)


class DTORun:
    """One optimization of a rollout's logits (Alg. 2), from the position to the rollout's end."""

    def __init__(
        self,
        policy: Policy,
        reward: RewardAdapter | None,
        config: NablaConfig,
        reward_prompt: str,
        prefix_ids: Sequence[int],
        committed: Sequence[int],
        tokens: Sequence[int],
        logits: torch.Tensor,
        stats: Stats,
        prefixes: Prefixes | None = None,
    ) -> None:
        # tokens: [L] rollout tokens; logits: [L, V] raw policy logits that produced them.
        # prefixes: prompt + committed encoded by the caller (the decoder extends them across positions);
        # encoded here when not given. Either way only when a pass needs them.
        self.policy, self.config, self.stats = policy, config, stats
        self.reward = gradient_reward(reward, config)
        self.prefix_ids, self.committed = list(prefix_ids), list(committed)
        self.tokens = torch.tensor(list(tokens), device=policy.device)
        rows = 1 if config.dto_positions == "first" else len(tokens)
        self.z0 = logits[:rows].detach().to(policy.device, torch.float32).clone()  # [rows, V] the rollout's logits
        self.z = torch.nn.Parameter(self.z0.clone())
        # why: the forward must see the sampled rollout, not its argmax: a sampled non-argmax token is
        # pinned to win the hard choice while its logit stays within `pin` of the row's max
        top = self.z.detach().max(-1).values
        self.pin = top - self.z.detach().gather(-1, self.tokens[:rows, None])[:, 0] + PIN_MARGIN  # [rows]
        self.pin[self.pin <= PIN_MARGIN] = 0.0
        self.scale = 1.0 / config.reward_weight if config.reward_weight > 0 else 1.0
        stats.dto_runs += 1
        self._prefixes = prefixes or partial(PrefixEncoder(policy, reward, config, stats).encode, reward_prompt, self.prefix_ids, self.committed)
        self._encoded: tuple[PolicyPrefix, RewardPrefix | None] | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self.probe_pass: ProbePass | None = None
        self.probe_reused = False
        self.loss_start: float | None = None
        self.loss_end: float | None = None
        self.cache_hits = 0
        self.steps = 0
        """DTO steps this run took (``dto_steps``, or 1 for a ``mirror`` step)."""

    def prefixes(self) -> tuple[PolicyPrefix, RewardPrefix | None]:
        """The encoded prefixes of the policy and of the gradient reward, obtained on first use."""
        if self._encoded is None:
            self._encoded = self._prefixes()
        return self._encoded

    def hard(self) -> torch.Tensor:
        """Current hard tokens: argmax of z with the rollout's tokens pinned, the rest of the rollout kept. [L]"""
        z = self.z.detach()
        top, chosen = z.max(-1)
        rows = chosen.shape[0]
        # argmax(z + pin·onehot(token)) without materializing [rows, V]: the token wins when lifted above the max
        pinned = z.gather(-1, self.tokens[:rows, None])[:, 0] + self.pin > top
        chosen = torch.where(pinned & (self.pin > 0), self.tokens[:rows], chosen)
        return torch.cat([chosen, self.tokens[rows:]])

    def loss_and_grad(self, hard: torch.Tensor) -> Pass:
        """One forward and backward pass of each model at hard one-hots: L, dL/dy ([L, V]) and log π per token."""
        prefix, reward_prefix = self.prefixes()
        with torch.enable_grad():
            y = self.one_hots(hard)
            logp = token_logprobs(self.policy, prefix, y, hard)
            soft = checked_soft(self.reward, self.reward.score_soft(reward_prefix, y)) if self.reward is not None and reward_prefix is not None else None
            loss = self.loss(logp, soft)
            loss.backward()
        return self.found(y, logp, soft, loss)

    def one_hots(self, hard: torch.Tensor) -> torch.Tensor:
        """[L, V] one-hots of ``hard`` that take gradients."""
        return torch.zeros(hard.shape[0], self.policy.vocab_size, device=hard.device).scatter_(1, hard[:, None], 1.0).requires_grad_(True)

    def loss(self, logp: torch.Tensor, soft: SoftScore | None) -> torch.Tensor:
        """L = −log π(y) − λ·r(y)."""
        loss = -logp.sum()
        if self.reward is not None:
            assert soft is not None
            loss = loss - self.config.reward_weight * soft.value
        return loss

    def found(self, y: torch.Tensor, logp: torch.Tensor, soft: SoftScore | None, loss: torch.Tensor) -> Pass:
        """The pass after its backward: counted in the run's stats, checked for non-finite values."""
        L = y.shape[0]
        prefix, _ = self.prefixes()
        extra = 0 if prefix.cache is not None else len(prefix.ids)
        self.stats.count_policy(1, L + extra)
        self.stats.count_policy(1, L + extra, backward=True)
        if soft is not None:
            self.stats.count_reward(soft.passes, soft.tokens)
            self.stats.count_reward(soft.passes, soft.tokens, backward=True)
        g = y.grad
        assert g is not None
        loss_value = float(loss.detach())
        if not math.isfinite(float(g.sum())) or not math.isfinite(loss_value):  # why: a NaN or inf anywhere reaches the sum
            raise NonFiniteGradient("DTO produced a non-finite loss or gradient")
        return Pass(loss_value, g, logp.detach())

    def _grad(self, hard: torch.Tensor) -> "PassSteps[torch.Tensor]":
        if self._cached is not None and torch.equal(hard, self._cached[0]):
            self.cache_hits += 1
            self.stats.cache_hits += 1
            return self._cached[1]
        loss, g, _ = yield PassRequest(self, hard)
        if self.loss_start is None:
            self.loss_start = loss
        self.loss_end = loss
        if self.config.gradient_cache:
            self._cached = (hard, g, loss)
        return g

    def probe(self, earlier: ProbePass | None = None) -> float:
        """Gradient norm ‖∂L/∂z‖ at the position, on the authors' scale (L / λ); its pass seeds step 1.

        ``earlier``: a probe pass from a previous position; used instead of a new pass when it was taken
        on the same response (:attr:`probe_reused`). The pass that served, new or earlier, is :attr:`probe_pass`.
        """
        from .calls import decode_alone  # why: calls imports this module (its executor runs the passes)

        return decode_alone(self.policy, self.probe_steps(earlier))

    def probe_steps(self, earlier: ProbePass | None = None) -> "PassSteps[float]":
        """:meth:`probe`, yielding the pass it needs (:func:`run_passes` runs those of many runs in one batch)."""
        self.stats.probes += 1
        hard = self.hard()
        tokens = hard.tolist()
        if earlier is not None and earlier.serves(self.committed, tokens):
            found = earlier.at(len(self.committed))
            self.probe_pass, self.probe_reused = earlier, True
            self.stats.probes_reused += 1
        else:
            found = yield PassRequest(self, hard)
            self.probe_pass = ProbePass([*self.committed, *tokens], found)
        loss, g, _ = found
        self.loss_start = self.loss_end = loss
        self._cached = (hard, g, loss)  # why: the first DTO step sees the same hard tokens
        return float(straight_through_grad(self.z.detach()[:1], g[:1], self.config.st_tau).norm()) * self.scale

    def optimize(self) -> torch.Tensor:
        """Run T AdamW steps with the cosine schedule; returns the optimized logits z̃ ([rows, V], fp32).

        With ``step="trust_region"`` the steps' net move is rescaled, row by row, to the KL ``target_kl``; with
        ``step="mirror"`` there are no AdamW steps (:meth:`mirror_steps`).
        """
        from .calls import decode_alone  # why: calls imports this module (its executor runs the passes)

        return decode_alone(self.policy, self.optimize_steps())

    def optimize_steps(self) -> "PassSteps[torch.Tensor]":
        """:meth:`optimize`, yielding each pass it needs (:func:`run_passes` runs those of many runs in one batch)."""
        if self.config.step == "mirror":
            return (yield from self.mirror_steps())
        steps = self.config.dto_steps
        # why: the fused kernel updates [L, V] logits in one pass (about 10x faster than foreach on CPU)
        opt = torch.optim.AdamW([self.z], lr=self.config.lr, weight_decay=self.config.weight_decay, fused=True)
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(t, steps, self.config.lr, self.config.min_lr)
            g = yield from self._grad(self.hard())
            self.z.grad = straight_through_grad(self.z.detach(), g[: self.z.shape[0]], self.config.st_tau)
            opt.step()
            self.steps += 1
            self.stats.dto_steps += 1
            if self._cached is not None and not self.config.gradient_cache:
                self._cached = None  # the probe's pass served step 1 only
        if self.config.step == "trust_region":
            # why: AdamW moves every logit by about ±Σ lr whatever the logits' scale; the direction is kept, the size is set in KL
            return trust_region(self.z0, self.z.detach(), self.config.tau, self.config.target_kl)
        return self.z.detach()

    def mirror_steps(self) -> "PassSteps[torch.Tensor]":
        """The exact minimizer of the linearised loss over proposal distributions inside the KL ball.

        With g = dL/dy at the rollout's tokens and q = softmax(z/τ), min ⟨g, p⟩ s.t. KL(p ‖ q) ≤ ``target_kl`` is
        p ∝ q·exp(−β·g), that is z̃ = z − α·g with α ≥ 0 set by bisection so that the KL is met (mirror descent's
        exponentiated-gradient step). It needs dL/dy at the rollout's tokens only: the probe's pass, no new one.
        """
        g = yield from self._grad(self.hard())  # [L, V]; the hard tokens are the rollout's, so the probe's pass serves
        self.steps += 1
        self.stats.dto_steps += 1
        z0 = self.z0  # [rows, V]
        return trust_region(z0, z0 - g[: z0.shape[0]].to(z0.dtype), self.config.tau, self.config.target_kl)


T = TypeVar("T")


@dataclass
class PassRequest:
    """A DTO run waiting on one pass of each model at ``hard`` (what :meth:`DTORun.loss_and_grad` computes)."""

    run: DTORun
    hard: torch.Tensor


PassSteps = Generator[PassRequest, Pass, T]
"""A probe or optimization in progress: yields each pass it needs, is sent the pass (or has its
:class:`NonFiniteGradient` thrown in), returns its outcome."""


def run_passes(requests: Sequence[PassRequest]) -> list[Pass | NonFiniteGradient]:
    """The passes of several DTO runs (of one policy and reward), in one batched pass of each model where they can
    share one; each counted in its own run's stats as if it ran alone. A run whose pass is not finite gets its
    :class:`NonFiniteGradient` (the others are unaffected: rows do not mix).

    Runs without a prefix cache (``prefix_cache=False``) pass alone, as does a lone request. More than
    :data:`PASS_ROWS` requests run as several batched passes.
    """
    out: list[Pass | NonFiniteGradient | None] = [None] * len(requests)
    together = [i for i, r in enumerate(requests) if r.run.prefixes()[0].snapshot is not None]
    if len({(id(requests[i].run.policy), id(requests[i].run.reward)) for i in together}) > 1:
        together = []
    chunks = [chunk for k in range(0, len(together), PASS_ROWS) if len(chunk := together[k : k + PASS_ROWS]) > 1]
    batched = {i for chunk in chunks for i in chunk}
    for i, request in enumerate(requests):
        if i not in batched:
            try:
                out[i] = request.run.loss_and_grad(request.hard)
            except NonFiniteGradient as err:
                out[i] = err
    for chunk in chunks:
        for i, found in zip(chunk, _passes_together([requests[i] for i in chunk])):
            out[i] = found
    return out  # type: ignore[return-value]


def _passes_together(requests: Sequence[PassRequest]) -> list[Pass | NonFiniteGradient]:
    """One batched forward and backward pass for runs that share a policy and a reward and have prefix caches."""
    runs = [r.run for r in requests]
    policy, reward = runs[0].policy, runs[0].reward
    prefixes = [run.prefixes() for run in runs]
    with torch.enable_grad():
        ys = [run.one_hots(r.hard) for run, r in zip(runs, requests)]
        logps = _batched_logprobs(policy, [p for p, _ in prefixes], ys, [r.hard for r in requests])
        softs: list[SoftScore | None] = [None] * len(runs)
        scored = [i for i, (_, rp) in enumerate(prefixes) if reward is not None and rp is not None]
        if scored:
            assert reward is not None
            found = reward.score_soft_batch([prefixes[i][1] for i in scored], [ys[i] for i in scored])  # type: ignore[misc]
            for i, scored_soft in zip(scored, found):
                softs[i] = checked_soft(reward, scored_soft)
        losses = [run.loss(logp, soft) for run, logp, soft in zip(runs, logps, softs)]
        torch.stack(losses).sum().backward()  # why: rows do not mix, so each y gets its own run's dL/dy
    out: list[Pass | NonFiniteGradient] = []
    for run, y, logp, soft, loss in zip(runs, ys, logps, softs, losses):
        try:
            out.append(run.found(y, logp, soft, loss))
        except NonFiniteGradient as err:
            out.append(err)
    return out


def _batched_logprobs(policy: Policy, prefixes: Sequence[PolicyPrefix], ys: Sequence[torch.Tensor], hards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`token_logprobs` of several rows in one pass: the prefix caches left-padded into one, the rows
    after them right-padded. Each result is [L_b]."""
    cache, prefix_mask = kv.stack([p.snapshot for p in prefixes])  # type: ignore[misc]
    lengths = [y.shape[0] for y in ys]
    # why: one embedding of every row, so the backward's [tokens, H] x [H, V] product runs once, not once a row
    embeds, new_mask = pad_rows(embed(torch.cat(list(ys)), policy.embedding, torch.cat(list(hards))).split(lengths))  # [B, T, H], [B, T]
    device, width = policy.device, embeds.shape[1]
    positions = torch.tensor([len(p.ids) for p in prefixes], device=device)[:, None] + torch.arange(width, device=device)[None]
    out = policy.model(
        inputs_embeds=embeds, attention_mask=torch.cat([prefix_mask.to(device), new_mask.to(device)], dim=1), position_ids=positions, cache=cache, use_cache=True
    )
    result = []
    # why: unbind, not out.logits[b]: each row's slice would give the backward a zero [B, T, V] gradient of its own
    for prefix, y, logits, n in zip(prefixes, ys, out.logits.unbind(0), lengths):
        first = (y[0] * prefix.next_logp).sum()[None]
        result.append(torch.cat([first, (y[1:] * upcast(logits[: n - 1]).log_softmax(-1)).sum(-1)]))
    return result
