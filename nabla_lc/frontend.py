"""What the front-ends share: the engine interface they use and their settings, whose parameters identify
their outputs (LangChain's cache key, the DSPy model name). Front-ends translate only; they never touch a model."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, AsyncIterator, Iterator, Mapping, Protocol, Sequence

from .config import ConfigError, NablaConfig
from .engine.types import Constraint, Request, Result, StreamEvent, TokenCallback
from .rewards.base import RewardAdapter


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class _Policy(Protocol):
    tokenizer: _Tokenizer
    model: Any
    """The policy model; its ``name_or_path`` (when it has one) names the front-end's model."""

    def room(self, prompt_ids: Sequence[int]) -> int: ...


class FrontEndEngine(Protocol):
    """What the front-ends use of :class:`nabla_lc.facade.Engine`."""

    config: NablaConfig
    policy: _Policy
    reward: RewardAdapter | None

    def request(
        self,
        prompt: str,
        *,
        chat: bool = True,
        system: str | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        constraint: Constraint | None = None,
    ) -> Request: ...

    def request_from_messages(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        constraint: Constraint | None = None,
        question: str | None = None,
    ) -> Request: ...

    def generate(
        self, requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None
    ) -> list[Result]: ...

    async def agenerate(
        self, requests: list[Request], config: NablaConfig | None = None, on_token: TokenCallback | None = None
    ) -> list[Result]: ...

    def stream(self, request: Request, config: NablaConfig | None = None) -> Iterator[StreamEvent]: ...

    def astream(self, request: Request, config: NablaConfig | None = None) -> AsyncIterator[StreamEvent]: ...


@dataclass(frozen=True)
class FrontEndSettings:
    """An engine and how a front-end decodes with it."""

    engine: FrontEndEngine
    config: NablaConfig
    """Decoding method and hyperparameters."""
    model_id: str
    """Name of the policy, for tracing and cache keys."""
    chat: bool = True
    """Apply the tokenizer's chat template to string prompts (a plain continuation when False)."""
    system: str | None = None
    """System message for prompts (and conversations) that have none."""
    return_trace: bool = False
    """Hand out the per-position trace with each result."""

    @property
    def parameters(self) -> dict[str, Any]:
        """Everything that changes the output: the identity of the front-end's answers."""
        return {
            "model_id": self.model_id,
            "reward": reward_identity(self.engine.reward),
            "chat": self.chat,
            "system": self.system,
            "return_trace": self.return_trace,
            **self.config.to_dict(),
        }

    def stop_strings(self, stop: str | Sequence[str] | None, config: NablaConfig | None = None) -> tuple[str, ...] | None:
        """The config's stop strings plus the call's (None when the call adds none).

        A string is one stop string (``stop="rare"`` stops at "rare", not at its letters); an empty one raises
        ``ValueError``, because it would stop every response before its first token.
        """
        if stop is None:
            return None
        calls = (stop,) if isinstance(stop, str) else tuple(stop)
        bad = [s for s in calls if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty strings, got {bad!r}")
        if not calls:
            return None
        return tuple(dict.fromkeys((*(config or self.config).stop, *calls)))

    def trace(self, result: Result) -> list[dict[str, Any]] | None:
        """The result's trace as plain dicts when :attr:`return_trace`, else None."""
        return [record.to_dict() for record in result.trace] if self.return_trace else None


CONFIG_FIELDS: frozenset[str] = frozenset(f.name for f in fields(NablaConfig))
"""Names accepted as per-call options (and as front-end constructor keywords)."""

OPTION_ALIASES: Mapping[str, str] = {"max_tokens": "max_new_tokens"}
"""Per-call option names of other libraries (LangChain, OpenAI, DSPy) mapped to NablaConfig fields."""


def is_call_option(name: str) -> bool:
    """Whether ``name`` is a per-call option: a NablaConfig field or an alias of one."""
    return name in CONFIG_FIELDS or name in OPTION_ALIASES


def call_config(config: NablaConfig, options: Mapping[str, Any]) -> NablaConfig:
    """``config`` with one call's options applied: NablaConfig fields, or their aliases (``max_tokens``).

    An unknown name raises ``TypeError`` naming it; a bad value raises :class:`~nabla_lc.config.ConfigError`
    naming the field; a field given under two names raises ``ConfigError``.
    """
    unknown = sorted(name for name in options if not is_call_option(name))
    if unknown:
        raise TypeError(f"unknown per-call option(s) {unknown}; accepted: NablaConfig fields and {sorted(OPTION_ALIASES)}")
    changes: dict[str, Any] = {}
    for name, value in options.items():
        field = OPTION_ALIASES.get(name, name)
        if field in changes:
            raise ConfigError(f"NablaConfig.{field} is given twice in one call (as {field!r} and an alias)")
        changes[field] = value
    return config.replace(**changes) if changes else config


def default_model_id(engine: FrontEndEngine) -> str:
    """The policy's ``name_or_path`` (transformers models carry one), else its class name."""
    model = engine.policy.model
    return getattr(model, "name_or_path", "") or type(model).__name__


def reward_identity(reward: RewardAdapter | None) -> str | None:
    """The reward's :attr:`~nabla_lc.rewards.base.RewardAdapter.identity` (None without a reward)."""
    return reward.identity if reward is not None else None
