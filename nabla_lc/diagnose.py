"""Does DTO move the policy, and does the reward's gradient know which token swaps raise the reward?

For each question: one rollout from the prompt (the first rollout ∇ would make); then, among the positions along
it that pass the gates a ∇ decode applies before its probe (entropy, and ``differ_threshold``), ``positions``
evenly spaced from the first to the last get:

* a DTO run (probe + optimize, as the decoder runs it, whatever ε_grad says) and the size of its move: logit
  spread, max |z̃ − z|, KL(softmax(z̃/τ) ‖ softmax(z/τ)), total variation, the chance that a proposal differs from
  the rollout's token before and after DTO (the proposal distribution: temperature τ, top-p), and whether the
  argmax changed;
* the **swap test**: for the ``k`` most likely other tokens j, the reward change the gradient predicts,
  ∂r/∂y · (e_j − e_y), against the actual change from scoring the response with that one token swapped and the
  rest fixed (Pearson correlation, sign agreement, and whether the predicted best swap is the actual best);
* the **proposal gain**: among those scored swaps, the expected actual reward change of a proposal drawn as ∇ draws
  it (softmax(·/τ), top-p), and the chance that it raises the reward, from z and from z̃. The swap test judges the
  reward's gradient; the gain judges the step: whether DTO moves proposals toward swaps that raise the reward.

Every pass is counted in one :class:`~nabla_lc.engine.accounting.Stats`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from statistics import mean, median
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .config import NablaConfig
from .engine.accounting import Stats
from .engine.decoder import entropy, gate, proposal_sampling
from .engine.dto import DTORun, NonFiniteGradient, kl_rows
from .engine.rollout import RolloutRow, Sampling, differ_chance, filter_logits, rollout
from .engine.types import Request
from .facade import Engine
from .rewards.base import checked_soft

log = logging.getLogger(__name__)


@dataclass
class Swap:
    """One alternative token at a position: the reward change predicted by the gradient and the actual one."""

    token: str
    predicted: float
    actual: float


@dataclass
class PositionDiagnosis:
    """The measurements at one probed position."""

    question: int
    """Index of the question in the diagnosed list."""
    index: int
    """Response position (0 = first response token)."""
    token: str
    """The rollout's token at the position."""
    logit_std: float
    top2_gap: float
    """Difference of the two largest logits."""
    grad_norm: float
    """The probe's ‖∂L/∂z‖ on the authors' scale (compared with ε_grad)."""
    max_move: float
    """max |z̃ − z| over the vocabulary."""
    kl: float
    """KL(softmax(z̃/τ) ‖ softmax(z/τ))."""
    tv: float
    """Total variation between the same two distributions."""
    p_differ_z: float
    """Chance that a proposal drawn from z (τ, top-p) differs from the rollout's token."""
    p_differ_dto: float
    """The same chance from the optimized logits z̃."""
    argmax_changed: bool
    swaps: list[Swap] = field(default_factory=list)
    swap_pearson: float | None = None
    """Pearson correlation of predicted and actual changes (None: a side is constant, or no reward gradient)."""
    swap_sign_agreement: float | None = None
    """Fraction of swaps whose predicted and actual changes have the same sign."""
    swap_best_found: bool | None = None
    """Whether the swap predicted best is the actual best."""
    swap_gain_z: float | None = None
    """The actual reward change of a proposal drawn from z (τ, top-p) given that it is one of the scored swaps."""
    swap_gain_dto: float | None = None
    """The same from the optimized logits z̃: above :attr:`swap_gain_z` when DTO moves proposals toward better swaps."""
    swap_win_z: float | None = None
    """The chance that such a proposal from z is a swap that raises the reward."""
    swap_win_dto: float | None = None
    """The same from z̃."""


@dataclass
class Diagnosis:
    """Every probed position and the means over them; ``stats`` counts every model pass the diagnosis made."""

    positions: list[PositionDiagnosis]
    summary: dict[str, Any]
    stats: Stats

    def to_dict(self) -> dict[str, Any]:
        return {
            "positions": [dataclasses.asdict(p) for p in self.positions],
            "summary": self.summary,
            "stats": self.stats.to_dict(),
        }


def check_sizes(positions: int, k: int) -> None:
    """Raise ValueError unless ``positions`` >= 1 and ``k`` >= 0."""
    if positions < 1 or k < 0:
        raise ValueError(f"positions must be >= 1 and k >= 0, got {positions} and {k}")


def diagnose(
    engine: Engine,
    requests: Sequence[Request],
    config: NablaConfig | None = None,
    *,
    positions: int = 2,
    k: int = 8,
    progress: bool = False,
) -> Diagnosis:
    """Diagnose DTO on the first rollout of each request (see the module's docstring); ``k=0`` skips the swap
    test, ``progress`` shows a bar."""
    config = config or engine.config
    check_sizes(positions, k)
    stats = Stats()
    found: list[PositionDiagnosis] = []
    start = time.perf_counter()
    with engine.lock, torch.no_grad():
        for q, request in enumerate(tqdm(requests, desc="diagnose", unit="question", disable=not progress)):
            found.extend(_diagnose_request(engine, request, config, q, positions, k, stats))
    stats.wall_s = time.perf_counter() - start
    return Diagnosis(found, summarize(found, k), stats)


def _diagnose_request(
    engine: Engine, request: Request, config: NablaConfig, q: int, positions: int, k: int, stats: Stats
) -> list[PositionDiagnosis]:
    policy, prompt, ctx = engine.policy, list(request.prompt_ids), engine.context(config)
    sampling = Sampling(config.temperature, config.top_p, config.top_k)
    row = RolloutRow(prompt, [], ctx.budget(request), ctx.stop(request), ctx.generator(request), stats)
    first = rollout(policy, [row], sampling, keep_logits=True)[0]
    stats.rollouts += 1
    assert first.logits is not None
    tokens, out = first.tokens, []
    eligible = [i for i in range(len(tokens)) if gate(first.logits[i], tokens[i], entropy(first.logits[i]), config) is None]
    for i in spread(eligible, positions):
        z = first.logits[i]  # [V]
        committed = tokens[:i]
        run = DTORun(policy, engine.reward, config, request.reward_prompt, prompt + committed, committed, tokens[i:], first.logits[i:], stats)
        try:
            grad_norm = run.probe()
            optimized = run.optimize()[0] if config.dto_steps > 0 else z.float()
        except NonFiniteGradient as err:
            log.warning("question %d, position %d: %s; skipped", q, i, err)
            continue
        found = _moves(policy.token_text(tokens[i]), z.float(), optimized, tokens[i], grad_norm, config, q, i)
        _swap_test(engine, request.reward_prompt, committed, tokens[i:], z, optimized, config, found, k, stats)
        out.append(found)
    return out


def spread(items: Sequence[int], count: int) -> list[int]:
    """``count`` items evenly spaced from the first to the last (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


def _moves(
    text: str, z: torch.Tensor, z_opt: torch.Tensor, token: int, grad_norm: float, config: NablaConfig, q: int, i: int
) -> PositionDiagnosis:
    """The size of DTO's move at one position. z, z_opt: [V] fp32."""
    sampling = proposal_sampling(config)
    p, p_opt = (z / config.tau).softmax(-1), (z_opt / config.tau).softmax(-1)
    top2 = z.topk(2).values
    return PositionDiagnosis(
        question=q,
        index=i,
        token=text,
        logit_std=float(z[torch.isfinite(z)].std()),
        top2_gap=float(top2[0] - top2[1]),
        grad_norm=grad_norm,
        max_move=float((z_opt - z).abs().max()),
        kl=float(kl_rows(z_opt[None], z[None], config.tau)[0]),
        tv=float(0.5 * (p_opt - p).abs().sum()),
        p_differ_z=differ_chance(z, token, sampling),
        p_differ_dto=differ_chance(z_opt, token, sampling),
        argmax_changed=int(z_opt.argmax()) != int(z.argmax()),
    )


def _swap_test(
    engine: Engine,
    prompt: str,
    committed: list[int],
    rest: list[int],
    z: torch.Tensor,
    z_opt: torch.Tensor,
    config: NablaConfig,
    found: PositionDiagnosis,
    k: int,
    stats: Stats,
) -> None:
    """Fill ``found``'s swap fields: the reward gradient's predicted changes against scored swaps, and what a proposal
    drawn before and after DTO gains among them. z, z_opt: [V] the position's logits before and after DTO."""
    reward = engine.reward
    if k == 0 or reward is None or not reward.differentiable:
        return
    g = reward_gradient(engine, prompt, committed, rest, stats)  # [V] ∂r/∂y at the position
    token = rest[0]
    logits = z.float().clone()  # the k most likely alternatives under the policy
    logits[token] = -math.inf
    alternatives = [int(j) for j in logits.topk(min(k, int(torch.isfinite(logits).sum()))).indices]
    responses = [committed + rest] + [committed + [j] + rest[1:] for j in alternatives]
    scores = engine.context().score(prompt, responses, stats)
    found.swaps = [
        Swap(engine.policy.token_text(j), float(g[j] - g[token]), scores[n + 1] - scores[0]) for n, j in enumerate(alternatives)
    ]
    predicted = [s.predicted for s in found.swaps]
    actual = [s.actual for s in found.swaps]
    found.swap_pearson = pearson(predicted, actual)
    found.swap_sign_agreement = mean((a > 0) == (b > 0) for a, b in zip(predicted, actual)) if found.swaps else None
    found.swap_best_found = bool(found.swaps) and max(range(len(predicted)), key=predicted.__getitem__) == max(
        range(len(actual)), key=actual.__getitem__
    )
    found.swap_gain_z, found.swap_win_z = proposal_gain(z.float(), alternatives, actual, config)
    found.swap_gain_dto, found.swap_win_dto = proposal_gain(z_opt, alternatives, actual, config)


def proposal_gain(logits: torch.Tensor, tokens: Sequence[int], changes: Sequence[float], config: NablaConfig) -> tuple[float | None, float | None]:
    """For a proposal drawn from ``logits`` ([V]) as ∇ draws it, given that it is one of ``tokens``: the expected reward
    change (``changes``, one a token) and the chance that the change is positive. (None, None) when none can be drawn."""
    sampling = proposal_sampling(config)
    probs = filter_logits(logits.float()[None] / sampling.temperature, sampling.top_p, sampling.top_k).softmax(-1)[0]
    p = probs[list(tokens)].double()
    if not tokens or float(p.sum()) <= 0:
        return None, None
    p = p / p.sum()
    change = torch.tensor(list(changes), dtype=torch.float64)
    return float((p * change).sum()), float(p[change > 0].sum())


def reward_gradient(engine: Engine, prompt: str, committed: list[int], rest: list[int], stats: Stats) -> torch.Tensor:
    """∂r/∂y at the first of ``rest``'s tokens, with every token a hard one-hot: one reward forward and backward. -> [V]"""
    reward = engine.reward
    assert reward is not None
    prefix = reward.prepare(prompt, committed)
    stats.count_reward(prefix.passes, prefix.tokens)
    hard = torch.tensor(rest, device=engine.policy.device)
    with torch.enable_grad():
        y = torch.zeros(len(rest), engine.policy.vocab_size, device=hard.device).scatter_(1, hard[:, None], 1.0).requires_grad_(True)
        soft = checked_soft(reward, reward.score_soft(prefix, y))
        soft.value.backward()
    stats.count_reward(soft.passes, soft.tokens)
    stats.count_reward(soft.passes, soft.tokens, backward=True)
    assert y.grad is not None
    return y.grad[0]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side has no spread (or fewer than 2 points)."""
    if len(xs) < 2:
        return None
    mx, my = mean(xs), mean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    if sx == 0 or sy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def summarize(found: Sequence[PositionDiagnosis], k: int) -> dict[str, Any]:
    """Means (and a few medians) over the probed positions."""

    def avg(values: Sequence[float | None]) -> float | None:
        kept = [float(v) for v in values if v is not None]
        return mean(kept) if kept else None

    kls = [p.kl for p in found]
    return {
        "positions": len(found),
        "logit_std_mean": avg([p.logit_std for p in found]),
        "top2_gap_mean": avg([p.top2_gap for p in found]),
        "grad_norm_median": median([p.grad_norm for p in found]) if found else None,
        "max_move_mean": avg([p.max_move for p in found]),
        "kl_mean": avg(kls),
        "kl_median": median(kls) if kls else None,
        "tv_mean": avg([p.tv for p in found]),
        "p_differ_z": avg([p.p_differ_z for p in found]),
        "p_differ_dto": avg([p.p_differ_dto for p in found]),
        "argmax_changed_rate": avg([float(p.argmax_changed) for p in found]),
        "swap_pearson_mean": avg([p.swap_pearson for p in found]),
        "swap_sign_agreement": avg([p.swap_sign_agreement for p in found]),
        "swap_best_found_rate": avg([None if p.swap_best_found is None else float(p.swap_best_found) for p in found]),
        "swap_best_chance": 1 / k if k else None,
        "swap_gain_z_mean": avg([p.swap_gain_z for p in found]),
        "swap_gain_dto_mean": avg([p.swap_gain_dto for p in found]),
        "swap_win_z_mean": avg([p.swap_win_z for p in found]),
        "swap_win_dto_mean": avg([p.swap_win_dto for p in found]),
    }
