"""One ∇ request's wall time (what ``nabla-lc solve`` makes a user wait) with the proposal window off and on, beside
Best-of-N's, on the embedded default (SmolLM2-135M-Instruct, the default reward and its config).

The first ``--questions`` arith dev questions are decoded one request at a time; for each question the configurations
run back to back (Best-of-N, ∇ with ``proposal_window`` 1, ∇ with each window of ``--windows``), so a change of load
on the machine falls on all of them alike. Writes ``OUT/results.json`` with every run's wall time, answer, rejection
counts and model calls, and the per-configuration sums::

    OMP_NUM_THREADS=1 python docs/nabla_window_latency.py /tmp/latency --questions 4 --windows 4
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from nabla_lc.bench.runner import load_task
from nabla_lc.loading import load_engine

from serve_load import run_header

log = logging.getLogger("nabla_window_latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for results.json")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="N of Best-of-N and ∇'s N_max")
    parser.add_argument("--windows", default="4", help="comma-separated proposal windows to run beside 1")
    parser.add_argument("--step", default=None, help="DTO step for every ∇ run (default: the shipped config's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    engine = load_engine("embedded", "default")
    task = load_task("arith:dev", limit=args.questions)
    nabla = engine.config.replace(method="nabla", n=args.n, **({"step": args.step} if args.step else {}))
    configs = {"bon": engine.config.replace(method="bon", n=args.n), "nabla W=1": nabla}
    configs.update({f"nabla W={w}": nabla.replace(proposal_window=int(w)) for w in args.windows.split(",")})
    out: dict[str, Any] = {**run_header(), "configs": {name: c.to_dict() for name, c in configs.items()}, "runs": []}
    for i, problem in enumerate(task.problems):
        request = engine.request(problem.problem, chat=True, system=task.system, seed=nabla.seed + i)
        for name, config in configs.items():
            start = time.perf_counter()
            result = engine.generate([request], config)[0]
            wall = time.perf_counter() - start
            s = result.stats
            out["runs"].append(
                {"question": i, "config": name, "wall_s": round(wall, 2), "text": result.text, "model_calls": s.model_calls,
                 "rollouts": s.rollouts, "rollout_tokens": s.rollout_tokens, "proposals": s.proposals, "rejections": s.rejections}
            )
            log.info("question %d %s: %.1f s, %d model calls", i, name, wall, s.model_calls)
        write(args.out, out, list(configs), i + 1)  # why: after every question, so a stopped run keeps what it measured


def write(directory: Path, out: dict[str, Any], names: list[str], questions: int) -> None:
    """``out`` with the sums over the questions so far and each configuration's wall time over Best-of-N's."""
    totals = {}
    for name in names:
        runs = [r for r in out["runs"] if r["config"] == name]
        totals[name] = {key: round(sum(r[key] for r in runs), 2) for key in ("wall_s", "model_calls", "rollouts", "proposals", "rejections")}
    out["questions_done"], out["totals"] = questions, totals
    out["wall_ratio_to_bon"] = {name: round(t["wall_s"] / totals["bon"]["wall_s"], 2) for name, t in totals.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(out, indent=1))
    log.info("after %d questions, wall time / Best-of-N's: %s", questions, out["wall_ratio_to_bon"])


if __name__ == "__main__":
    main()
