"""``nabla-lc costs``: one DTO step against one forward pass over the same tokens (:mod:`nabla_lc.bench.costs`)."""

from __future__ import annotations

import argparse
import json

from ..bench.costs import costs_report


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("costs", help="benchmark: one DTO step / one forward pass (rollout 64/128/256, prompt 64/512)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per setting (the median is reported)")
    p.add_argument("--rollout-lens", default="64,128,256", help="comma-separated rollout lengths")
    p.add_argument("--prompt-lens", default="64,512", help="comma-separated prompt lengths")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = costs_report(
        [int(r) for r in args.rollout_lens.split(",")], [int(p) for p in args.prompt_lens.split(",")], args.repeats, progress=not args.json
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['device']} ({report['dtype']}, {report['threads']} threads)")
    print(f"{'prompt':>6} {'rollout':>7} {'prefix KV':>9} {'step s':>8} {'fwd s':>8} {'step/fwd':>8}")
    for r in report["settings"]:
        print(f"{r['prompt_len']:>6} {r['rollout_len']:>7} {r['prefix_cache']!s:>9} {r['dto_step_s']:>8.4f} {r['forward_s']:>8.4f} {r['dto_step_over_forward']:>8.2f}")
    return 0
