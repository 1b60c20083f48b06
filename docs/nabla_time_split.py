"""Where ∇'s time goes with requests one at a time and together, and what batching each kind of pass gains on this CPU.

Part 1 decodes the first ``--requests`` arith test questions with ∇ (N_max ``--n``) on the embedded default
(SmolLM2-135M-Instruct, the default reward and its config), first one ``generate`` call after another, then all
submitted at once as separate jobs (as the server submits concurrent requests), and splits the wall time of each
phase into exclusive time per kind of work: rollout decoding steps, rollout joins (encoding a rollout's prefix),
DTO passes (a forward and backward pass of the policy and the reward at the rollout's tokens), DTO prefix
encodings, reward scoring of complete responses, and the rest (DTO steps without a pass, the trust region, gates,
proposals, the scheduler).

Part 2 times passes of the shapes ∇ runs outside rollouts at batch sizes 1, 4 and 8 on random token ids: a DTO pass
(frozen policy, cached prefix of ``--prefix`` tokens, 16 or 32 new tokens, gradients to the inputs) and reward
scoring of complete responses, and reports the per-row gain of each batch over rows one at a time. Writes
``OUT/results.json``::

    OMP_NUM_THREADS=1 nice -n 10 python docs/nabla_time_split.py docs/results/nabla-time-split
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from nabla_lc import kv
from nabla_lc.bench.runner import load_task
from nabla_lc.engine import context, dto, rollout
from nabla_lc.loading import load_engine
from nabla_lc.rewards.transformer import TransformerReward

from serve_load import run_header

log = logging.getLogger("nabla_time_split")

KINDS = (
    (rollout.RolloutBatch, "step", "rollout steps"),
    (rollout.RolloutBatch, "add", "rollout joins"),
    (dto.DTORun, "loss_and_grad", "DTO passes"),
    (dto, "_passes_together", "DTO passes"),
    (dto.PrefixEncoder, "encode", "DTO prefix encodings"),
    (context.DecodingContext, "score", "scoring"),
    (TransformerReward, "score_groups", "scoring"),
)


class Timers:
    """Exclusive wall time per kind of work: a wrapped call's time less that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._inner: list[float] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        function: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                inner = self._inner.pop()
                self.seconds[label] += spent - inner
                self.calls[label] += 1
                if self._inner:
                    self._inner[-1] += spent

        setattr(owner, name, timed)

    def split(self, wall_s: float) -> dict[str, Any]:
        out = {label: {"s": round(self.seconds[label], 2), "calls": self.calls[label]} for _, _, label in KINDS}  # calls: Python calls (a batched pass is one)
        out["rest"] = {"s": round(wall_s - sum(self.seconds.values()), 2)}
        self.seconds.clear()
        self.calls.clear()
        return out


def per_row_s(function: Callable[[], None], reps: int) -> float:
    function()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        function()
    return (time.perf_counter() - start) / reps


def dto_pass(model: Any, batch: int, prefix: int, new: int) -> Callable[[], None]:
    """A DTO-shaped pass: ``new`` tokens after a cached ``prefix``, forward and backward to the input vectors."""
    g = torch.Generator().manual_seed(batch * 1000 + new)
    embedding = model.get_input_embeddings().weight
    ids = torch.randint(100, 5000, (batch, prefix + new), generator=g)
    cache = kv.empty()
    with torch.no_grad():
        model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
    kept = kv.Snapshot.take(cache)
    positions = torch.arange(prefix, prefix + new)[None].expand(batch, new)

    def run() -> None:
        kept.restore()
        x = embedding[ids[:, prefix:]].detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(inputs_embeds=x, position_ids=positions, cache=cache, use_cache=True)
            out.logits.float().log_softmax(-1).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for results.json")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="∇'s N_max")
    parser.add_argument("--prefix", type=int, default=150, help="cached prefix tokens of the part-2 DTO pass")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each part-2 pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    engine = load_engine("embedded", "default")
    task = load_task("arith:test", limit=args.requests)
    config = engine.config.replace(method="nabla", n=args.n)
    requests = [
        engine.request(p.problem, chat=True, system=task.system, seed=engine.config.seed + i, max_new_tokens=args.max_tokens)
        for i, p in enumerate(task.problems)
    ]
    timers = Timers()
    for owner, name, label in KINDS:
        timers.wrap(owner, name, label)
    out: dict[str, Any] = {
        **run_header(),
        "config": config.to_dict(),
    }

    start = time.perf_counter()
    alone = [engine.generate([r], config)[0] for r in requests]
    alone_s = time.perf_counter() - start
    out["one_at_a_time"] = {"wall_s": round(alone_s, 2), "split": timers.split(alone_s)}
    log.info("one at a time: %.1f s", alone_s)
    before = dataclasses.replace(engine.scheduler.stats)
    start = time.perf_counter()
    futures = [engine.submit([r], config) for r in requests]
    together = [f.result()[0] for f in futures]
    together_s = time.perf_counter() - start
    stats = engine.scheduler.stats
    steps, passes = stats.steps - before.steps, stats.passes - before.passes
    out["together"] = {
        "wall_s": round(together_s, 2),
        "split": timers.split(together_s),
        "rows_per_step": round((stats.row_steps - before.row_steps) / max(steps, 1), 2),
        "dto_passes_batched": passes,
        "rows_per_dto_pass": round((stats.pass_rows - before.pass_rows) / max(passes, 1), 2),
        "identical_outputs": sum(a.token_ids == b.token_ids for a, b in zip(alone, together)),
    }
    out["speedup"] = round(alone_s / together_s, 2)
    log.info("together: %.1f s (%.2fx)", together_s, alone_s / together_s)

    model = engine.policy.model
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # why: DTO takes gradients to its token vectors only
    passes: dict[str, Any] = {}
    for new in (16, 32):
        times = {b: per_row_s(dto_pass(model, b, args.prefix, new), args.reps) / b for b in (1, 4, 8)}
        passes[f"DTO pass, {new} tokens after {args.prefix}"] = {f"B={b}": {"s_per_row": round(t, 3), "gain": round(times[1] / t, 2)} for b, t in times.items()}
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)
    reward = engine.reward
    assert reward is not None
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, 5000, (args.max_tokens,), generator=g).tolist() for _ in range(8)]
    prompts = [p.problem for p in task.problems][:1] * 8

    def scoring(batch: int) -> Callable[[], None]:
        return lambda: reward.score(prompts[:batch], responses[:batch]).values.sum().item() and None

    times = {b: per_row_s(scoring(b), args.reps) / b for b in (1, 4, 8)}
    passes[f"scoring, {args.max_tokens}-token responses"] = {f"B={b}": {"s_per_row": round(t, 3), "gain": round(times[1] / t, 2)} for b, t in times.items()}
    out["batching_gain"] = passes
    log.info("batching gains: %s", passes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
