"""nabla-lc: ∇-Reasoner (first-order test-time search) with Best-of-N, self-consistency and greedy on one engine."""

from .config import ConfigError, NablaConfig
from .engine.accounting import Stats
from .facade import Engine
from .engine.trace import PositionRecord
from .engine.types import Request, Result
from .rewards.base import RewardAdapter

__all__ = ["ConfigError", "Engine", "NablaConfig", "PositionRecord", "Request", "Result", "RewardAdapter", "Stats"]
__version__ = "0.1.0"
