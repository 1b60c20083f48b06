"""Chunked prefill on the embedded model (issue 34): a short request's latency alone, then beside one long prompt's
prefill, encoded at once and in chunks (``Scheduler.prefill_chunk``, ``nabla-lc serve --prefill-chunk``).

Loads the embedded SmolLM2-135M-Instruct (no reward; greedy), times a short request (``--short-tokens`` new tokens)
alone, then for each chunk size (none first) submits a prompt of about ``--long-tokens`` tokens, waits
``--head-start`` seconds so that its prefill is under way, submits the short request, and records the short
request's latency (and the long one's, where it is let finish: unchunked, or with ``--finish-long``). Writes ``OUT/results.json`` with the run's command, commit, machine and load,
and whether each output equals the unchunked one::

    cd docs && OMP_NUM_THREADS=1 python prefill_stall.py results/prefill-stall [--chunks 16,64]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from nabla_lc import NablaConfig
from nabla_lc.loading import load_engine

from serve_load import run_header  # the same header (command, commit, machine, load) as the serving benchmark

log = logging.getLogger("prefill_stall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for results.json")
    parser.add_argument("--long-tokens", type=int, default=8000, help="the long prompt's length in tokens (about)")
    parser.add_argument("--short-tokens", type=int, default=4, help="new tokens of the short request")
    parser.add_argument("--chunks", default="16,64", help="chunk sizes to try after the unchunked run, comma-separated")
    parser.add_argument("--head-start", type=float, default=1.0, help="seconds the long prefill runs before the short request")
    parser.add_argument("--idle-runs", type=int, default=3, help="runs of the short request alone (the median is its idle latency)")
    parser.add_argument("--finish-long", action="store_true", help="let each chunked long prefill finish (its latency and output), not cancel it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    header = run_header()
    engine = load_engine("embedded", None, config=NablaConfig(method="greedy", max_new_tokens=args.short_tokens))
    config = engine.config
    short = engine.request("What is 17 + 25?", seed=0)
    sentence = "The quick brown fox jumps over the lazy dog, then counts from one to nine. "
    per = len(engine.policy.tokenizer.encode(sentence))
    long = engine.request(sentence * (args.long_tokens // per) + "Summarize.", seed=0, max_new_tokens=1)
    log.info("long prompt: %d tokens; short prompt: %d tokens", len(long.prompt_ids), len(short.prompt_ids))

    idle = []
    for _ in range(args.idle_runs):
        start = time.perf_counter()
        expected_short = engine.generate([short], config)[0]
        idle.append(time.perf_counter() - start)
    runs: list[dict[str, Any]] = []
    expected_long = None
    for chunk in [None, *(int(c) for c in args.chunks.split(",") if c)]:
        engine.scheduler.prefill_chunk = chunk
        start = time.perf_counter()
        long_future = engine.submit([long], config)
        time.sleep(args.head_start)
        short_start = time.perf_counter()
        short_result = engine.submit([short], config).result()[0]
        short_s = time.perf_counter() - short_start
        run = {"prefill_chunk": chunk, "short_latency_s": round(short_s, 3), "short_over_idle": round(short_s / statistics.median(idle), 2),
               "short_output_equal": short_result.token_ids == expected_short.token_ids}  # fmt: skip
        if chunk is None or args.finish_long:
            long_result = long_future.result()[0]
            expected_long = expected_long or long_result
            run.update(long_latency_s=round(time.perf_counter() - start, 3), long_output_equal_to_unchunked=long_result.token_ids == expected_long.token_ids)
        else:  # why: a chunked 8000-token prefill runs on for minutes on 2 cores; the short request's latency is the figure
            long_future.cancel()
        runs.append(run)
        log.info("%s", runs[-1])
    engine.generate([short], config)  # why: returns once the scheduler is past a cancelled prefill's last chunk
    out = {
        **header, "long_prompt_tokens": len(long.prompt_ids), "short_prompt_tokens": len(short.prompt_ids), "short_new_tokens": args.short_tokens,
        "head_start_s": args.head_start, "short_idle_latency_s": [round(s, 3) for s in idle], "short_idle_median_s": round(statistics.median(idle), 3),
        "runs": runs,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
