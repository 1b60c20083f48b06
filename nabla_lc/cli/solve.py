"""``nabla-lc solve QUESTION``: one question, any method, on the embedded default or local models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing
from typing import Any, get_args, get_origin

from .cli import add_model_flags, base_config, load_engine
from .config import ConfigError, NablaConfig
from .methods import method_names

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 20_000


def add_config_flags(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    """One ``--field-name`` flag per NablaConfig field (but ``exclude``), typed from the dataclass; unset flags keep the default."""
    group = parser.add_argument_group("decoding (NablaConfig fields)")
    hints = typing.get_type_hints(NablaConfig)
    for f in dataclasses.fields(NablaConfig):
        if f.name in exclude:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f"default: {f.default!r}"}
        if f.name == "method":
            group.add_argument(flag, choices=method_names(), **kw)
        elif hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=get_args(hint), **kw)
        elif f.name == "stop":
            group.add_argument(flag, action="append", metavar="STRING", **kw)
        else:
            base = next((t for t in (int, float, str) if t is hint or t in get_args(hint)), str)
            group.add_argument(flag, type=base, **kw)
    group.add_argument("--n-max", dest="n", type=int, default=None, help="N_max for method nabla (the same field as --n)")
    # why: an excluded field's name may be another flag's (solve's --trace is a page), which must not reach the config
    parser.set_defaults(config_fields=tuple(f.name for f in dataclasses.fields(NablaConfig) if f.name not in exclude))


def config_from_args(args: argparse.Namespace) -> NablaConfig:
    """The config with every flag of :func:`add_config_flags` that the user set applied."""
    changes = {name: getattr(args, name) for name in args.config_fields if getattr(args, name) is not None}
    return base_config(args).replace(**changes)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "solve",
        help="answer one question with ∇-Reasoner or a baseline",
        description="Answer one question. The decoding flags' defaults are NablaConfig's (the paper's); with --reward default "
        "(the default) they start from default_reward_config() instead: --grad-threshold 0.01, --dto-positions first, "
        "--max-new-tokens 96.",
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
        from .trace_view import write_trace

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
