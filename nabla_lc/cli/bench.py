"""``nabla-lc bench``: run methods × N over a benchmark (in this process, or on a Ray cluster with ``--ray``), or merge shard results (``--merge DIR``)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from ..bench.grading import DEFAULT_TIMEOUT_S, Grader, require_bench_extra
from ..bench.report import write_report
from ..bench.runner import Task, jobs, load_task, merge_results, parse_shard, run_bench, run_jobs
from ..config import ConfigError, NablaConfig
from ..methods import method_names
from .flags import add_model_flags, base_config, load_engine

log = logging.getLogger(__name__)

def add_parsers(subparsers: Any) -> None:
    """Register the ``bench`` subcommand."""
    p = subparsers.add_parser("bench", help="benchmark the decoding methods (greedy, BoN, SC, weighted BoN, ∇, ...) on a math dataset", description=__doc__)
    p.add_argument("--data", help="a JSONL file with problem/final_answer, or arith, arith:dev, arith:test")
    p.add_argument("--methods", default=",".join(method_names()), help="comma-separated methods (default: every registered one)")
    p.add_argument("--n", default="1,2,4,8", help="comma-separated N (N_max for nabla; greedy runs once)")
    p.add_argument("--limit", type=int, help="only the first LIMIT problems")
    p.add_argument("--seed", type=int, help="base seed; problem i uses seed + i (default: NablaConfig.seed)")
    add_model_flags(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a NablaConfig field (VALUE as JSON, else a string); repeatable")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--shard", help="run only problems with index mod n == i, as i/n")
    p.add_argument("--batch-size", type=int, default=1, help="problems per engine.generate call")
    p.add_argument(
        "--share-samples",
        action="store_true",
        help="serve the methods that share samples (bon, sc, weighted_bon) at every N from one set of max(N) samples per problem (same answers and "
        "model calls as separate runs; wall time below max(N) is scaled by N / max(N))",
    )
    p.add_argument("--grade-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per grading call")
    p.add_argument("--merge", type=Path, metavar="DIR", help="join DIR's shard results and write its summary and plots; runs no model")
    ray = p.add_argument_group("Ray (pip install 'nabla-lc[ray]')")
    ray.add_argument("--ray", action="store_true", help="decode on a Ray cluster's workers, one engine each; this process grades and writes the rows")
    ray.add_argument("--address", help="the Ray cluster to join ('auto': the one `ray start` runs on this machine; default: start a local one)")
    ray.add_argument("--workers", type=int, help="Ray workers (default: one per GPU in the cluster, else one per CPU)")
    p.set_defaults(func=run)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` → a dict; each value parsed as JSON, else kept as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def parse_list(text: str, kind: type = str) -> list[Any]:
    """``"a,b,c"`` → ``[kind(a), kind(b), kind(c)]``."""
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or merge) as the flags say; bad input raises (``nabla-lc`` prints it as one line)."""
    if args.merge is not None:
        write_report(args.merge, merge_results(args.merge))
        return 0
    if args.data is None or args.out is None:
        raise ValueError("--data and --out are required (or --merge DIR)")
    config = base_config(args).replace(**parse_sets(args.set))
    if args.seed is not None:
        config = config.replace(seed=args.seed)
    methods, ns = parse_list(args.methods), parse_list(args.n, int)
    jobs(methods, ns)  # why: reject bad methods or N before loading any model
    shard = parse_shard(args.shard) if args.shard else None
    _check_ray_flags(args)
    require_bench_extra()  # why: before loading any model, not when the first answer is graded or plotted
    with Grader(args.grade_timeout) as grader:
        task = load_task(args.data, limit=args.limit, grader=grader)
        run_info = {"policy": args.policy, "reward": args.reward}
        if args.ray:
            rows = _run_on_ray(args, task, methods, ns, config, run_info)
        else:
            engine = load_engine(args, config)
            rows = run_bench(
                engine, task, methods, ns, config, args.out, batch_size=args.batch_size, shard=shard, run_info=run_info,
                share_samples=args.share_samples,
            )
    if shard is None:
        write_report(args.out, rows, title=f"{task.name}: {args.policy} with reward {args.reward}")
    else:
        log.info("shard %d/%d done; when every shard is, run: nabla-lc bench --merge %s", shard[0], shard[1], args.out)
    return 0


def _check_ray_flags(args: argparse.Namespace) -> None:
    if not args.ray:
        if args.address is not None or args.workers is not None:
            raise ValueError("--address and --workers need --ray")
        return
    if args.shard:
        raise ValueError("--shard and --ray exclude each other: Ray spreads the whole run over its workers")
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError("--ray needs Ray, not installed here; install the ray extra: pip install 'nabla-lc[ray]'")


def _run_on_ray(args: argparse.Namespace, task: Task, methods: list[str], ns: list[int], config: NablaConfig, run_info: dict[str, Any]) -> list[dict[str, Any]]:
    """The run on a Ray cluster: each worker loads the engine the model flags name (so the model files must be on every node)."""
    from ..bench.ray_pipeline import ray_executor
    from ..cluster import joined

    with joined(args.address) as resources:
        execute = ray_executor(functools.partial(load_engine, args, config), task, resources, args.workers)
        return run_jobs(
            execute, task, methods, ns, config, args.out, batch_size=args.batch_size, run_info=run_info, share_samples=args.share_samples
        )
