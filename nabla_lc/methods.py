"""The method registry: one :class:`MethodSpec` per decoding method, registered once.

Everything that depends on which methods exist reads it here: ``NablaConfig.method``'s check, the
engine's dispatch, ``Engine.sample``/``select``, the benchmark's jobs, shared samples and plots, the
CLI's choices and the tests' fake engine. The built-in methods are registered by
:mod:`nabla_lc.strategies`; adding one is a module there plus one entry in its registry list.

This module sits at the bottom of the package (it imports nothing from it), so that the config can
check names against it; ``run`` is therefore typed loosely here and precisely in :mod:`nabla_lc.strategies`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

Chooser = Callable[[Sequence["str | None"], "Sequence[float] | None"], int]
"""``choose(answers, rewards)``: the index of the sample a sample-set method returns (rewards: None when unscored)."""


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of the package needs to know about one decoding method."""

    name: str
    """The value of ``NablaConfig.method``."""
    run: Callable[..., Any]
    """``run(ctx: DecodingContext, requests: Sequence[Request]) -> list[Result]`` (a :data:`nabla_lc.strategies.Run`)."""
    needs_reward: bool
    """Whether it scores responses (it fails without a reward model; sample sets are drawn scored for it)."""
    chooser: Chooser | None = None
    """For methods that pick one of ``n`` independent samples: how. They can be served by ``Engine.select``."""
    streams_live: bool = False
    """Whether its text streams as it is sampled (one sample, nothing to choose)."""
    runs_once: bool = False
    """Whether ``n`` does not matter to it: the benchmark runs it once, at N = 1."""
    shares_samples: bool = False
    """Whether ``nabla-lc bench --share-samples`` serves it at every N from one sample set per problem."""
    constrained: bool = False
    """Whether it decodes under a request's grammar constraint (``Request.constraint``); the engine refuses a
    constrained request for a method that would ignore it."""
    logprobs: bool = False
    """Whether its results carry log-probabilities when a request asks (``Request.logprobs``): the methods whose
    response is one rollout as it was sampled. The engine refuses such a request for the others."""
    fixed: tuple[tuple[str, Any], ...] = ()
    """Config fields the method always runs with, whatever the call asks (greedy: ``temperature`` 0 and ``n`` 1), as
    (name, value) pairs; :meth:`~nabla_lc.config.NablaConfig.ran` applies them, so reports say what ran."""
    steps: Callable[..., Any] | None = None
    """``steps(ctx, requests) -> Job[list[Result]]``: the method as a job (:data:`nabla_lc.engine.calls.Job`), so that
    the engine's scheduler batches its rollouts with other requests'. None: ``run`` runs alone, between batches."""
    dto_passes: bool = False
    """Whether its job yields DTO passes (:class:`~nabla_lc.engine.calls.PassCall`): while another such job is in
    flight, the scheduler holds a pass back for it to join (:data:`~nabla_lc.scheduler.PASS_WAIT_STEPS`)."""


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method; a name that is taken raises ValueError."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (for tests that register a throwaway one)."""
    del _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name raises KeyError naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {list(_REGISTRY)}") from None
