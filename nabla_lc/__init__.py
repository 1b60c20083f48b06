"""nabla-lc: ∇-Reasoner (first-order test-time search) with Best-of-N, self-consistency and greedy on one engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, NablaConfig
from .engine.accounting import Stats
from .engine.trace import PositionRecord
from .engine.types import Request, Result
from .facade import Engine
from .rewards.base import RewardAdapter

if TYPE_CHECKING:
    from .langchain import ChatNablaReasoner, NablaReasonerLLM

__all__ = [
    "ChatNablaReasoner",
    "ConfigError",
    "Engine",
    "NablaConfig",
    "NablaReasonerLLM",
    "PositionRecord",
    "Request",
    "Result",
    "RewardAdapter",
    "Stats",
]
__version__ = "0.1.0"

LAZY: frozenset[str] = frozenset({"ChatNablaReasoner", "NablaReasonerLLM"})
"""The LangChain front-ends, imported on first use so that ``import nabla_lc`` does not import LangChain."""


def __getattr__(name: str) -> Any:
    if name in LAZY:
        from . import langchain  # the one upward import the layering test allows: a lazy attribute (PEP 562)

        return getattr(langchain, name)
    raise AttributeError(f"module 'nabla_lc' has no attribute {name!r}")
