"""One validated settings object for every decoding method."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

from .methods import get_method, method_names


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check_logprobs(method: str) -> None:
    """ConfigError where ``method`` returns no log-probabilities (its response is not one sampled rollout)."""
    if not get_method(method).logprobs:
        serve = [name for name in method_names() if get_method(name).logprobs]
        raise ConfigError(f"method {method!r} returns no logprobs (its response is not one sampled rollout); use one of {serve}")


MIN_TEMPERATURE = 1e-3
"""The least positive ``temperature``, ``tau`` and ``st_tau``: logits are divided by them in fp32, and below about
1e-37 that overflows to inf (a NaN distribution); 1e-3 leaves a wide margin and is greedy in all but near-ties."""
MIN_TOP_P = 1e-6
"""The least ``top_p``: the top token's probability is at least 1/V, so below 1e-6 (V up to a million) every
nucleus is the top token alone, and a smaller value only underflows fp32."""
MAX_LR = 100.0
"""The largest ``lr``: AdamW moves each logit by about ``lr`` a step, so past a logit spread's scale (about 10) a
larger step only drives the logits toward fp32's overflow."""


@dataclass(frozen=True)
class NablaConfig:
    """Hyperparameters of ∇-Reasoner and the baselines, with the paper's defaults.

    The loss optimized by DTO is ``L = -reward_weight * r(y|x) - sum_t log pi(y_t | x, y_<t)``.
    The authors' code weights the two terms with ``reward_coeff=1.0`` and ``nll_coeff=1e-3``;
    since AdamW is invariant to the scale of the loss, that is ``reward_weight = 1.0 / 1e-3 = 1000``.
    ``grad_threshold`` is compared with the gradient of the authors' scale, ``L / reward_weight``.
    """

    method: str = "nabla"
    """Decoding method, a registered name (:mod:`nabla_lc.methods`): ``nabla``, ``bon`` (Best-of-N), ``sc``
    (self-consistency), ``weighted_bon``, ``greedy``, ``pf`` (particle filtering) or ``beam`` (reward-guided beam search) built in."""
    n: int = 8
    """Budget of rollouts: N for ``bon``/``sc``/``weighted_bon``, N_max for ``nabla`` (the first rollout counts),
    the particles of ``pf`` and the partial responses ``beam`` extends at each step."""
    max_new_tokens: int = 256
    """Most response tokens per request."""
    temperature: float = 0.5
    """Rollout sampling temperature (0 means greedy rollouts; else at least :data:`MIN_TEMPERATURE`)."""
    top_p: float = 0.95
    """Nucleus mass for rollouts and for resampling a proposal, in [:data:`MIN_TOP_P`, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling (0 disables)."""
    seed: int | None = 0
    """Seed for every random draw of a request; ``None`` draws from the global generator."""
    stop: tuple[str, ...] = ()
    """Stop strings: decoding ends at the first one, which is never part of the text."""

    reward_weight: float = 1000.0
    """λ, the weight of the reward against the log-likelihood (authors: reward_coeff / nll_coeff = 1 / 1e-3)."""
    dto_steps: int = 20
    """T, gradient steps per DTO run (0 turns DTO off: plain rejection sampling)."""
    lr: float = 0.01
    """AdamW learning rate at the first DTO step, at most :data:`MAX_LR`."""
    min_lr: float = 0.001
    """Learning rate reached by the cosine schedule at the last DTO step."""
    weight_decay: float = 0.01
    """AdamW weight decay on the logits (the authors' code: 0); ``lr * weight_decay`` is at most 1 (each step scales
    the logits by 1 - lr * weight_decay: past 1 they flip sign and grow until they overflow)."""
    tau: float = 0.5
    """τ of resampling a proposal from the optimized logits, softmax(z̃/τ); the trust region's KL is taken at it too
    (at least :data:`MIN_TEMPERATURE`)."""
    st_tau: float = 0.5
    """Temperature of the straight-through backward pass, softmax(z/st_tau) (the authors' code: 1.0; at least
    :data:`MIN_TEMPERATURE`)."""
    step: Literal["adam", "trust_region", "mirror"] = "adam"
    """How a DTO run moves the logits: ``adam``, the paper's T AdamW steps as they are; ``trust_region``, the
    same steps' direction rescaled so that KL(softmax(z̃/τ) ‖ softmax(z/τ)) equals ``target_kl`` in every optimized row;
    or ``mirror``, the exact minimizer of the linearised loss inside that KL ball (an exponentiated-gradient step
    along dL/dy itself, z̃ = z − α·dL/dy; one pass, the probe's, and no AdamW steps)."""
    target_kl: float = 0.5
    """KL (nats) that a ``trust_region`` or ``mirror`` step moves each optimized row's distribution at temperature τ."""
    entropy_threshold: float = 0.25
    """ε_ent: a position gets DTO only when the entropy (nats) of its next-token distribution exceeds this."""
    differ_threshold: float = 0.0
    """A position gets a probe only when the chance that a resample (softmax(z/τ), top-p) differs from the rollout's
    token exceeds this; 0 turns the gate off (the paper)."""
    grad_threshold: float = 8.0
    """ε_grad: a position gets DTO only when the probe's gradient norm at it exceeds this."""
    dto_positions: Literal["all", "first"] = "all"
    """Which rollout positions DTO updates: ``all`` (Alg. 2) or only the ``first``."""
    gradient_cache: bool = True
    """Reuse dL/dy while the argmax tokens are unchanged (exact)."""
    prefix_cache: bool = True
    """Reuse the prefix's KV cache in every DTO step (the policy's from the rollout's cache, the reward's encoded once
    and extended); off, every pass encodes the prefix afresh."""
    probe_reuse: bool = True
    """Answer a probe from an earlier probe's pass while the response is unchanged (exact)."""
    coupled_rollouts: bool = False
    """∇: every rollout of a request draws the token at response position p with the same randomness (common random
    numbers, seeded by the request's seed and p), so a proposal's continuation differs from the rollout it is compared
    with only where the changed token changes the policy's distribution (off: each rollout draws on from the request's
    generator, as the paper's sampling does)."""
    proposal_window: int = 1
    """∇: how many proposals along the current rollout roll out together. With W > 1 the decoder walks on past a
    proposal as if it were rejected, up to W proposals (or the budget), rolls their continuations out in one batch and
    scores them in one pass; the first accepted one wins and the continuations after it are discarded (their passes
    are counted; N_max counts only the rollouts the one-at-a-time search makes). W > 1 draws every proposal and
    rollout from a generator keyed by the request and the position, so every W > 1 makes the same decisions; W = 1
    draws from the request's generator in decoding order (the paper's sampling)."""
    no_gradient_reward: Literal["likelihood", "error"] = "likelihood"
    """With a reward that has no gradient: run DTO on the likelihood term alone (with a warning) or raise."""
    trace: bool = True
    """Record a per-position trace of each request."""

    step_separator: str = "\n\n"
    """Step-level search (``pf``, ``beam``): a step ends after the token that completes this text ("" for none)."""
    step_tokens: int = 0
    """Step-level search: a step also ends after this many tokens (0: at the separator only), for models that do not
    write steps."""
    resample_temperature: float = 1.0
    """``pf``: particles are resampled with probabilities softmax(reward / resample_temperature)."""
    beam_width: int = 2
    """``beam``: M, the partial responses kept at each step; each is extended n / M times (n must be a multiple of M;
    an M above n counts as n)."""
    dvts: bool = False
    """``beam``: diverse verifier tree search, M independent subtrees that each keep their own best extension."""
    search_answer: Literal["best", "weighted_majority"] = "best"
    """``pf``/``beam``: the answer is the finished response with the highest reward (``best``) or the answer with the
    largest summed weight (softmax(reward / resample_temperature) over the finished responses), and its best response."""

    def __post_init__(self) -> None:
        _check(self.method in method_names(), "method", f"must be one of {method_names()}, got {self.method!r}")
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(
            _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens",
            f"must be an integer >= 1, got {self.max_new_tokens!r}",
        )
        _check(
            _finite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE),
            "temperature",
            f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {self.temperature!r}",
        )
        _check(_finite(self.top_p) and MIN_TOP_P <= self.top_p <= 1, "top_p", f"must be in [{MIN_TOP_P:g}, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}")
        _check(
            isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            f"must be a tuple of non-empty strings, got {self.stop!r}",
        )
        _check(_finite(self.reward_weight) and self.reward_weight >= 0, "reward_weight", f"must be >= 0, got {self.reward_weight!r}")
        _check(_is_int(self.dto_steps) and self.dto_steps >= 0, "dto_steps", f"must be an integer >= 0, got {self.dto_steps!r}")
        _check(_finite(self.lr) and 0 < self.lr <= MAX_LR, "lr", f"must be in (0, {MAX_LR:g}], got {self.lr!r}")
        _check(_finite(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, NablaConfig.lr = {self.lr!r}], got {self.min_lr!r}")
        _check(
            _finite(self.weight_decay) and 0 <= self.weight_decay * self.lr <= 1,
            "weight_decay",
            f"must be >= 0 with lr * weight_decay <= 1 (lr {self.lr!r}), got {self.weight_decay!r}",
        )
        _check(_finite(self.tau) and self.tau >= MIN_TEMPERATURE, "tau", f"must be >= {MIN_TEMPERATURE:g}, got {self.tau!r}")
        _check(_finite(self.st_tau) and self.st_tau >= MIN_TEMPERATURE, "st_tau", f"must be >= {MIN_TEMPERATURE:g}, got {self.st_tau!r}")
        _check(self.step in ("adam", "trust_region", "mirror"), "step", f"must be 'adam', 'trust_region' or 'mirror', got {self.step!r}")
        _check(_finite(self.target_kl) and self.target_kl > 0, "target_kl", f"must be > 0, got {self.target_kl!r}")
        _check(
            _finite(self.differ_threshold) and 0 <= self.differ_threshold < 1,
            "differ_threshold",
            f"must be in [0, 1), got {self.differ_threshold!r}",
        )
        _check(_finite(self.entropy_threshold), "entropy_threshold", f"must be a finite number, got {self.entropy_threshold!r}")
        _check(_finite(self.grad_threshold), "grad_threshold", f"must be a finite number, got {self.grad_threshold!r}")
        _check(
            _is_int(self.proposal_window) and self.proposal_window >= 1,
            "proposal_window",
            f"must be an integer >= 1, got {self.proposal_window!r}",
        )
        _check(self.dto_positions in ("all", "first"), "dto_positions", f"must be 'all' or 'first', got {self.dto_positions!r}")
        _check(
            self.no_gradient_reward in ("likelihood", "error"),
            "no_gradient_reward",
            f"must be 'likelihood' or 'error', got {self.no_gradient_reward!r}",
        )
        _check(isinstance(self.step_separator, str), "step_separator", f"must be a string, got {self.step_separator!r}")
        _check(_is_int(self.step_tokens) and self.step_tokens >= 0, "step_tokens", f"must be an integer >= 0, got {self.step_tokens!r}")
        _check(
            bool(self.step_separator) or self.step_tokens > 0,
            "step_separator",
            "is empty and step_tokens is 0: step-level search would have no step boundary",
        )
        _check(
            _finite(self.resample_temperature) and self.resample_temperature > 0,
            "resample_temperature",
            f"must be > 0, got {self.resample_temperature!r}",
        )
        _check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", f"must be an integer >= 1, got {self.beam_width!r}")
        _check(
            self.method != "beam" or self.n % min(self.beam_width, self.n) == 0,
            "beam_width",
            f"must divide NablaConfig.n = {self.n!r} (or exceed it) for method 'beam', got {self.beam_width!r}",
        )
        _check(
            self.search_answer in ("best", "weighted_majority"),
            "search_answer",
            f"must be 'best' or 'weighted_majority', got {self.search_answer!r}",
        )
        for f in fields(self):
            if f.type == "bool":  # every switch, including ones added later (annotations are strings here)
                _check(isinstance(getattr(self, f.name), bool), f.name, f"must be True or False, got {getattr(self, f.name)!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "NablaConfig":
        """Build from a mapping; an unknown key raises :class:`ConfigError` naming it."""
        return cls().replace(**values)

    def replace(self, **changes: Any) -> "NablaConfig":
        """A copy with some fields changed; unknown names raise :class:`ConfigError`."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown NablaConfig field(s) {unknown}; known fields: {sorted(known)}")
        if isinstance(changes.get("stop"), list):  # why: JSON (to_dict, --set) has lists; any other type is checked as given
            changes["stop"] = tuple(changes["stop"])
        return dataclasses.replace(self, **changes)

    def ran(self) -> "NablaConfig":
        """The config ``method`` runs with: its fixed fields applied (greedy: ``temperature=0``, ``n=1``)."""
        fixed = dict(get_method(self.method).fixed)
        return self.replace(**fixed) if fixed else self

    def without_effect(self) -> dict[str, str]:
        """The sampling fields whose value does not change how ``method`` decodes, each with why: the method's fixed
        fields that differ from their fixed value (greedy: ``temperature``, ``n``), and ``top_p``/``top_k`` when it
        decodes at temperature 0 (argmax). Front-ends report the ones a caller set."""
        fixed = dict(get_method(self.method).fixed)
        unused = {
            name: f"method {self.method!r} always runs with {name} = {value!r}" for name, value in fixed.items() if getattr(self, name) != value
        }
        if self.ran().temperature == 0:
            unused.update(dict.fromkeys(("top_p", "top_k"), "temperature 0 decodes greedily (argmax), so it has no effect"))
        return unused

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-ready)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"NablaConfig.{name} {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
