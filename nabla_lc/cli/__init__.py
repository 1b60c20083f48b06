"""The ``nabla-lc`` command: each subcommand lives in its own module and only translates flags."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Sequence

# Modules exposing ``add_parser(subparsers)``; each registers one subcommand with ``func=run``.
COMMANDS: tuple[str, ...] = ("nabla_lc.solve", "nabla_lc.diagnose_cli", "nabla_lc.costs", "nabla_lc.bench.cli", "nabla_lc.rewards.train", "nabla_lc.bench.reward_recipe")


DTYPES = ("float32", "bfloat16", "float16")
EXPECTED_ERRORS = (ValueError, OSError, ModuleNotFoundError)
"""Errors of input, files and installation (a bad flag value, a missing model or package, an output in use): one line, exit 2."""


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


def base_config(args: argparse.Namespace) -> Any:
    """The defaults the flags start from: the paper's, with ε_grad rescaled for the project's default reward."""
    from .config import NablaConfig

    if args.reward == "default":
        from .rewards.default import default_reward_config

        return default_reward_config()
    return NablaConfig()


def load_engine(args: argparse.Namespace, config: Any) -> Any:
    """The Engine for the model flags (imports torch and transformers only when called)."""
    import torch

    from .facade import Engine
    from .models import load_policy
    from .rewards.load import load_reward

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_policy(args.policy, device=args.device, dtype=dtype)
    reward = load_reward(
        args.reward, model, tokenizer, dtype=dtype, vocab_bridge=args.vocab_bridge, trust_remote_code=args.trust_remote_code
    )
    return Engine(model, tokenizer, reward, config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nabla-lc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EXPECTED_ERRORS as err:
        if args.verbose:
            raise  # why: --verbose keeps the traceback for a bug report
        print(f"nabla-lc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
