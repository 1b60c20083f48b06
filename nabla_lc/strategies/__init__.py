"""Decoding methods, one module each, over the engine's shared rollout, scoring and accounting code.

A method is a :data:`Run` plus a :class:`~nabla_lc.methods.MethodSpec`; :data:`BUILT_IN` is the registry
list. Adding a method is a module here and one entry there (or a :func:`~nabla_lc.methods.register` call).
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..engine.context import DecodingContext
from ..engine.types import Request, Result
from ..methods import MethodSpec, register
from . import beam, bon, greedy, nabla, pf, sc, weighted_bon
from .sampling import SampleSet, draw, draw_steps, select

Run = Callable[[DecodingContext, Sequence[Request]], "list[Result]"]
"""How a method decodes a batch of requests."""

BUILT_IN: tuple[MethodSpec, ...] = (greedy.SPEC, bon.SPEC, sc.SPEC, weighted_bon.SPEC, nabla.SPEC, pf.SPEC, beam.SPEC)
"""The registry's built-in entries, in the order the CLI and the benchmark list them."""

for _spec in BUILT_IN:
    register(_spec)

__all__ = ["BUILT_IN", "Run", "SampleSet", "draw", "draw_steps", "select"]
