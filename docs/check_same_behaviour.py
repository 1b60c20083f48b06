"""Record what the embedded default decodes on a few arith test questions, to show a refactor changed nothing.

Runs greedy, Best-of-4, SC@4, weighted BoN@4 and ∇ at N_max 4 (one ``generate`` call of all questions per
method, as ``nabla-lc bench --batch-size 8`` would), then BoN, SC and weighted BoN at N = 1, 2, 4 selected from
one shared, scored sample set (``--share-samples``). Prompts, seeds, the reward and the config are the bench's
(``--reward default``). Writes every text, answer, reward, finish reason, streamed text, sample list and count
except wall time to a JSON file; two such files from two commits should be identical::

    OMP_NUM_THREADS=1 python docs/check_same_behaviour.py /tmp/before.json
    OMP_NUM_THREADS=1 python docs/check_same_behaviour.py /tmp/after.json && cmp /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from nabla_lc import Engine
from nabla_lc.bench.runner import load_task
from nabla_lc.models import load_embedded
from nabla_lc.rewards.default import default_reward_config
from nabla_lc.rewards.load import load_reward

log = logging.getLogger("check_same_behaviour")

METHODS = (("greedy", 1), ("bon", 4), ("sc", 4), ("weighted_bon", 4), ("nabla", 4))
SHARED = (("bon", (1, 2, 4)), ("sc", (1, 2, 4)), ("weighted_bon", (1, 2, 4)))


def record(result: Any, streamed: str) -> dict[str, Any]:
    """Everything a result holds but its wall time."""
    stats = {k: v for k, v in result.stats.to_dict().items() if k != "wall_s"}
    return {
        "text": result.text,
        "streamed": streamed,
        "answer": result.answer,
        "reward": result.reward,
        "finish_reason": result.finish_reason,
        "token_ids": list(result.token_ids),
        "stats": stats,
        "samples": result.samples,
        "trace": [record.to_dict() for record in result.trace],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--limit", type=int, default=8, help="arith test questions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    model, tokenizer = load_embedded()
    config = default_reward_config()
    engine = Engine(model, tokenizer, load_reward("default", model, tokenizer), config)
    task = load_task("arith:test", limit=args.limit)

    def requests() -> list[Any]:
        return [engine.request(p.problem, chat=True, system=task.system, seed=config.seed + i) for i, p in enumerate(task.problems)]

    out: dict[str, Any] = {"questions": [p.problem for p in task.problems], "config": config.to_dict(), "runs": {}}
    for method, n in METHODS:
        start = time.perf_counter()
        deltas: dict[int, list[str]] = {}
        results = engine.generate(
            requests(), config.replace(method=method, n=n), on_token=lambda i, d: deltas.setdefault(i, []).append(d),
            extract_answer=task.extract_answer,
        )
        out["runs"][f"{method}@{n}"] = [record(r, "".join(deltas.get(i, []))) for i, r in enumerate(results)]
        log.info("%s@%d: %.1f s", method, n, time.perf_counter() - start)
    sets = engine.sample(requests(), config.replace(method="bon", n=4), scored=True, extract_answer=task.extract_answer)
    for method, ns in SHARED:
        for n in ns:
            results = [engine.select(s, config.replace(method=method, n=n), task.extract_answer) for s in sets]
            out["runs"][f"shared:{method}@{n}"] = [record(r, "") for r in results]
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
