"""``nabla-lc diagnose``: how far DTO moves the policy, and whether the reward's gradient predicts token swaps."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from .flags import add_config_flags, add_model_flags, config_from_args, load_engine


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="measure DTO's move and the reward gradient's swap test along first rollouts",
        description=__doc__ + " Decoding flags start from the same defaults as solve's.",
    )
    p.add_argument("--data", default="arith:dev", help="arith:dev (default), arith:test, or a JSONL file with problem/final_answer")
    p.add_argument("--limit", type=int, default=8, help="questions (the first LIMIT)")
    p.add_argument("--positions", type=int, default=2, help="probed positions per question")
    p.add_argument("--k", type=int, default=8, help="alternative tokens per position in the swap test (0: no swap test)")
    p.add_argument("--json", action="store_true", help='print {"positions": [...], "summary": {...}, "stats": {...}}')
    add_model_flags(p)
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.runner import load_task, task_requests
    from ..diagnose import check_sizes, diagnose

    try:
        config = config_from_args(args)
        task = load_task(args.data, limit=args.limit)
        check_sizes(args.positions, args.k)  # why: before the model loads
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"nabla-lc diagnose: {err}", file=sys.stderr)
        return 2
    engine = load_engine(args, config)
    requests, _ = task_requests(engine, task.system, config, list(enumerate(task.problems)))  # seeded as the bench seeds them
    result = diagnose(engine, requests, config, positions=args.positions, k=args.k, progress=True)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for key, value in result.summary.items():
            print(f"{key:>22}: {f'{value:.4f}' if isinstance(value, float) else value}")
        print(f"{'model_calls':>22}: {result.stats.model_calls} (paper rule {result.stats.model_calls_paper})")
    return 0
