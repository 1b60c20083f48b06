"""lm-eval's accuracy against ``nabla-lc serve`` beside the bench's, on the same arith test questions, embedded model.

Decodes the first ``--questions`` arith test questions greedily three ways with one engine (the embedded SmolLM2-135M-
Instruct policy, greedy, the bench's 256 new tokens): the bench (``run_bench``, as ``nabla-lc bench --data arith:test
--methods greedy`` runs it), lm-eval 0.4.13's ``local-completions`` (the bench's chat prompt rendered to text, 4 prompts
per request) and ``local-chat-completions`` (the question as the user message under the bench's system message, 4
concurrent requests) against the server on a loopback port; both lm-eval tasks are graded by the bench's own check
(:mod:`nabla_lc.bench.lmeval`). Writes each accuracy, how many questions got the bench's very response and verdict,
and the wall times to ``OUT/results.json``::

    python docs/lmeval_arith.py docs/results/lmeval-arith [--questions 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from nabla_lc import NablaConfig
from nabla_lc.bench import lmeval
from nabla_lc.bench.runner import load_task, run_bench
from nabla_lc.loading import load_engine
from nabla_lc.server import ServerSettings, create_app, serving

from serve_load import run_header

log = logging.getLogger("lmeval_arith")

KEY = "lmeval-benchmark-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for results.json")
    parser.add_argument("--questions", type=int, default=50, help="the first arith test questions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    engine = load_engine("embedded", None, config=NablaConfig(method="greedy"))
    task = load_task("arith:test", limit=args.questions)
    out: dict[str, Any] = {**run_header(), "config": engine.config.to_dict(), "questions": args.questions}
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        rows = run_bench(engine, task, ["greedy"], [1], engine.config, Path(scratch) / "bench", batch_size=8)
        out["bench"] = {"acc": sum(r["correct"] for r in rows) / len(rows), "wall_s": round(time.perf_counter() - start, 1)}
        log.info("bench: %s", out["bench"])
        bench = {r["id"]: r for r in rows}
        prompts = lmeval.rendered_prompts(engine.policy.tokenizer, task.problems, task.system)
        task_dir = lmeval.write_task(Path(scratch) / "task", task.problems, prompts, max_gen_toks=engine.config.max_new_tokens)
        app = create_app(engine, ServerSettings(api_key=KEY, max_queue=64))
        with serving(app) as url:
            model = httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
            out["served_model_name"] = model
            for mode, concurrent in (("text", 1), ("chat", 4)):
                start = time.perf_counter()
                measured = lmeval.evaluate(mode, url, model, KEY, task_dir, batch_size=4, num_concurrent=concurrent)  # type: ignore[arg-type]
                same_text = sum(s["resps"][0][0] == bench[s["doc"]["id"]]["text"] for s in measured["samples"])
                same_verdict = sum(bool(s["acc"]) == bench[s["doc"]["id"]]["correct"] for s in measured["samples"])
                out[lmeval.MODELS[mode]] = {  # type: ignore[index]
                    "acc": measured["acc"], "n": measured["n"], "same_response_as_bench": same_text, "same_verdict_as_bench": same_verdict,
                    "wall_s": round(time.perf_counter() - start, 1),
                }  # fmt: skip
                log.info("%s: %s", lmeval.MODELS[mode], out[lmeval.MODELS[mode]])  # type: ignore[index]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
