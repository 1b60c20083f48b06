"""``nabla-lc solve QUESTION``: one question, any method, on the embedded default or local models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ..config import ConfigError
from .flags import add_config_flags, add_model_flags, config_from_args, load_engine

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 20_000


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "solve",
        help="answer one question with ∇-Reasoner or a baseline",
        description="Answer one question. The decoding flags' defaults are NablaConfig's (the paper's); with --reward default "
        "(the default) they start from default_reward_config() instead: --grad-threshold 0.01, --dto-positions first, "
        "--max-new-tokens 96, --step trust_region, --target-kl 0.5.",
    )
    p.add_argument("question", help="the question (the chat template is applied)")
    p.add_argument("--json", action="store_true", help='print {"text", "answer", "stats", ...} as JSON')
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--trace", metavar="HTML", default=None, help="write the decoding trace as a self-contained HTML page")
    add_model_flags(p)
    add_config_flags(p, exclude=frozenset({"trace"}))  # why: --trace names the HTML page; the config keeps its trace
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    question = args.question.strip()
    if not question:
        print("nabla-lc solve: the question is empty", file=sys.stderr)
        return 2
    if len(question) > MAX_QUESTION_CHARS:
        print(f"nabla-lc solve: the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ConfigError as err:
        print(f"nabla-lc solve: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    engine = load_engine(args, config)
    load_s = time.perf_counter() - start
    try:
        request = engine.request(question, system=args.system)
        with tqdm(total=engine.context(config).budget(request), unit="tok", desc=config.method, file=sys.stderr, leave=False) as bar:
            result = engine.generate([request], config, on_token=lambda _, text: bar.update(1))[0]
    except ValueError as err:  # over-long prompt and similar input errors
        print(f"nabla-lc solve: {err}", file=sys.stderr)
        return 2
    stats = result.stats.to_dict()
    if args.trace:
        from ..trace_view import write_trace

        write_trace(result, engine.policy.decode, args.trace, prompt=question, title=f"∇-Reasoner trace ({config.method})")
    if args.json:
        out = {"text": result.text, "answer": result.answer, "stats": stats, "method": config.method, "reward": result.reward,
               "finish_reason": result.finish_reason, "load_s": load_s}
        print(json.dumps(out, indent=2))
    else:
        print(result.text)
        print(f"\nanswer: {result.answer}")
        print(
            f"[{config.method}] model calls {stats['model_calls']} (paper rule {stats['model_calls_paper']}), rollouts {stats['rollouts']}, "
            f"DTO runs {stats['dto_runs']}, proposals {stats['proposals']}, rejections {stats['rejections']}, "
            f"{stats['wall_s']:.1f} s (+{load_s:.1f} s loading)"
        )
    return 0
