"""What the front-ends share: the engine interface they use and their settings, whose parameters identify
their outputs (LangChain's cache key, the DSPy model name). Front-ends translate only; they never touch a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol, Sequence

from .config import NablaConfig
from .engine.types import Request, Result, StreamEvent, TokenCallback
from .rewards.base import RewardAdapter


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class _Policy(Protocol):
    tokenizer: _Tokenizer
    model: Any
    """The policy model; its ``name_or_path`` (when it has one) names the front-end's model."""


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
    ) -> Request: ...

    def request_from_messages(
        self,
        messages: Sequence[dict[str, str]],
        *,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> Request: ...

    def generate(
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

    def stop_strings(self, stop: Sequence[str] | None) -> tuple[str, ...] | None:
        """The config's stop strings plus the call's (None when the call adds none)."""
        if not stop:
            return None
        return tuple(dict.fromkeys((*self.config.stop, *stop)))

    def trace(self, result: Result) -> list[dict[str, Any]] | None:
        """The result's trace as plain dicts when :attr:`return_trace`, else None."""
        return [record.to_dict() for record in result.trace] if self.return_trace else None


def default_model_id(engine: FrontEndEngine) -> str:
    """The policy's ``name_or_path`` (transformers models carry one), else its class name."""
    model = engine.policy.model
    return getattr(model, "name_or_path", "") or type(model).__name__


def reward_identity(reward: RewardAdapter | None) -> str | None:
    """The reward's :attr:`~nabla_lc.rewards.base.RewardAdapter.identity` (None without a reward)."""
    return reward.identity if reward is not None else None
