"""Flags shared by the subcommands: the models to load and the NablaConfig fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, get_args, get_origin

import torch

from ..config import NablaConfig
from ..facade import Engine
from ..loading import load_engine as build_engine
from ..loading import recommended_config
from ..methods import method_names

DTYPES = ("float32", "bfloat16", "float16")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--policy, --reward, --device, --dtype, --vocab-bridge, --trust-remote-code."""
    parser.add_argument("--policy", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a checkpoint directory, a GGUF file or a cached model id")
    parser.add_argument(
        "--reward",
        default="default",
        help="'default' (the project's reward for the embedded policy), 'judge' (the policy as its own judge), 'none', "
        "a LoRA reward .safetensors file, or a reward checkpoint directory",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--vocab-bridge", action="store_true", help="map the policy's vocabulary onto a reward model's that only partly matches")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a reward checkpoint's own model code (Qwen2.5-Math-PRM)")


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


def base_config(args: argparse.Namespace) -> NablaConfig:
    """The defaults the flags start from: the config recommended for ``--reward``."""
    return recommended_config(args.reward)


def config_from_args(args: argparse.Namespace) -> NablaConfig:
    """The recommended config with every flag of :func:`add_config_flags` that the user set applied."""
    changes = {name: getattr(args, name) for name in args.config_fields if getattr(args, name) is not None}
    return base_config(args).replace(**changes)


def load_engine(args: argparse.Namespace, config: NablaConfig) -> Engine:
    """The Engine for the model flags, with ``config``."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return build_engine(
        args.policy, args.reward, config=config, device=args.device, dtype=dtype, vocab_bridge=args.vocab_bridge,
        trust_remote_code=args.trust_remote_code,
    )
