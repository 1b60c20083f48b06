"""Load benchmark of ``nabla-lc serve`` on the embedded model: concurrent requests against the same ones one at a time.

Starts the server (the embedded SmolLM2-135M-Instruct policy, the default reward and its config) on a loopback port,
then, for ∇ (N_max 4) and greedy, sends the first ``--requests`` arith test questions through the ``openai`` client
(streaming, so that time to first token is seen) one at a time, then all at once from as many threads. Writes
throughput (requests/s, completion tokens/s), latency p50/p95, time to first token p50/p95, the scheduler's batch
counts (decoding steps, DTO passes and scorings, with their rows), and whether every concurrent output equals its one-at-a-time
output, to ``OUT/results.json``::

    python docs/serve_load.py docs/results/serve-load [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import torch

from nabla_lc.bench.runner import load_task
from nabla_lc.loading import load_engine
from nabla_lc.server import ServerSettings, create_app, serving

log = logging.getLogger("serve_load")

KEY = "load-benchmark-key"
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (("nabla", {"method": "nabla", "n": 4}), ("greedy", {"method": "greedy"}))


def run_header() -> dict[str, Any]:
    """What a results file names its run by: the command, the commit, the machine (CPU, cores, torch threads) and
    the load average when it started (other work on the machine)."""
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "command": " ".join(["python", *sys.argv]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "load_average_at_start": os.getloadavg(),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low, high = int(at), min(int(at) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def one(client: openai.OpenAI, model: str, question: str, system: str | None, seed: int, options: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """Send one streaming request; its text, tokens, latency and time to first token."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, seed=seed, stream=True, stream_options={"include_usage": True},
        extra_body={"nabla": options},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    latency = time.perf_counter() - start
    return {"text": "".join(parts), "tokens": usage.completion_tokens, "latency_s": latency, "ttft_s": first if first is not None else latency}


def summary(runs: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    latencies, ttfts = [r["latency_s"] for r in runs], [r["ttft_s"] for r in runs]
    tokens = sum(r["tokens"] for r in runs)
    return {
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(runs) / wall_s, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2),
        "latency_p50_s": round(percentile(latencies, 0.5), 2),
        "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 2),
        "ttft_p95_s": round(percentile(ttfts, 0.95), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory for results.json")
    parser.add_argument("--requests", type=int, default=8, help="requests per method (and concurrent clients)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--methods", default="greedy,nabla", help="comma-separated, run in this order: greedy, nabla")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server's engine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    engine = load_engine("embedded", "default")
    task = load_task("arith:test", limit=args.requests)
    app = create_app(engine, ServerSettings(api_key=KEY, model_name="embedded", max_queue=4 * args.requests))
    known = dict(METHODS)
    wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {sorted(known)}")
    out: dict[str, Any] = {
        **run_header(),
        "config": engine.config.to_dict(),
        "max_tokens": args.max_tokens,
        "methods": {},
    }
    with serving(app) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=3600)
        for name in wanted:
            options = known[name]
            calls = [(p.problem, task.system, engine.config.seed + i, options, args.max_tokens) for i, p in enumerate(task.problems)]
            start = time.perf_counter()
            alone = [one(client, "embedded", *call) for call in calls]
            alone_s = time.perf_counter() - start
            log.info("%s one at a time: %.1f s", name, alone_s)
            before = dataclasses.replace(engine.scheduler.stats)
            start = time.perf_counter()
            with ThreadPoolExecutor(len(calls)) as pool:
                together = list(pool.map(lambda call: one(client, "embedded", *call), calls))
            together_s = time.perf_counter() - start
            log.info("%s concurrent: %.1f s", name, together_s)
            stats = engine.scheduler.stats
            steps = stats.steps - before.steps
            out["methods"][name] = {
                "options": options,
                "one_at_a_time": summary(alone, alone_s),
                "concurrent": summary(together, together_s),
                "speedup": round(alone_s / together_s, 2),
                "identical_outputs": sum(a["text"] == b["text"] for a, b in zip(alone, together)),
                "concurrent_steps": steps,
                "concurrent_rows_per_step": round((stats.row_steps - before.row_steps) / max(steps, 1), 2),
                "concurrent_dto_passes": stats.passes - before.passes,
                "concurrent_rows_per_dto_pass": round((stats.pass_rows - before.pass_rows) / max(stats.passes - before.passes, 1), 2),
                "concurrent_scorings": stats.scorings - before.scorings,
                "concurrent_requests_per_scoring": round((stats.scoring_rows - before.scoring_rows) / max(stats.scorings - before.scorings, 1), 2),
                "requests": [{"alone": a, "concurrent": b} for a, b in zip(alone, together)],
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s", args.out / "results.json")


if __name__ == "__main__":
    main()
