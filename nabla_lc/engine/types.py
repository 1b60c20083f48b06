"""What goes into the engine and what comes out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .accounting import Stats
from .trace import PositionRecord

FinishReason = Literal["stop", "length"]

ConstraintKind = Literal["json_schema", "regex", "ebnf"]


@dataclass(frozen=True)
class Constraint:
    """A grammar every response token must follow (:mod:`nabla_lc.engine.constraints` masks the logits with it).

    Build one with :meth:`json_schema`, :meth:`regex` or :meth:`ebnf`; a grammar that does not compile fails
    before decoding, with ``ValueError`` naming ``Request.constraint``.
    """

    kind: ConstraintKind
    """``json_schema``, ``regex``, or ``ebnf`` (the GBNF dialect of llama.cpp, root rule ``root``)."""
    spec: str
    """The schema as JSON text, the regular expression, or the grammar."""

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "regex", "ebnf"):
            raise ValueError(f"Constraint.kind must be 'json_schema', 'regex' or 'ebnf', got {self.kind!r}")
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ValueError(f"Constraint.spec must be a non-empty string, got {self.spec!r:.80}")

    @classmethod
    def json_schema(cls, schema: "dict[str, Any] | str") -> "Constraint":
        """Responses that are JSON documents valid under ``schema`` (a dict or its JSON text); properties are written in
        the schema's order (keys are not sorted: a "reasoning" field declared before "answer" comes first)."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        """Responses that match ``pattern`` in full."""
        return cls("regex", pattern)

    @classmethod
    def ebnf(cls, grammar: str) -> "Constraint":
        """Responses derived from the grammar's ``root`` rule."""
        return cls("ebnf", grammar)


@dataclass(frozen=True)
class Request:
    """One prompt to decode. An invalid field raises ``ValueError`` naming it (``Request.<field> ...``)."""

    prompt_ids: tuple[int, ...]
    """The prompt after templating, in the policy's vocabulary."""
    reward_prompt: str
    """The user's text as the reward model should see it (its own template is applied by the adapter)."""
    seed: int | None = None
    """Overrides the config's seed for this request."""
    max_new_tokens: int | None = None
    """Overrides the config's max_new_tokens for this request."""
    stop: tuple[str, ...] | None = None
    """Overrides the config's stop strings for this request."""
    constraint: Constraint | None = None
    """A grammar the response follows (every method samples every token under its mask); None: free text."""
    logprobs: int | None = None
    """With an integer k >= 0: the result carries each response token's log-probability under the policy and the k
    most likely tokens at its position (:attr:`Result.logprobs`); None: no log-probabilities. Only methods whose
    :attr:`~nabla_lc.methods.MethodSpec.logprobs` is true take it."""

    def __post_init__(self) -> None:
        ids_ok = isinstance(self.prompt_ids, tuple) and all(_is_int(t) and t >= 0 for t in self.prompt_ids)
        _check(ids_ok, "prompt_ids", "a tuple of token ids", self.prompt_ids)
        _check(isinstance(self.reward_prompt, str), "reward_prompt", "a string", self.reward_prompt)
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        budget_ok = self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1)
        _check(budget_ok, "max_new_tokens", "None (the config's) or an integer >= 1", self.max_new_tokens)
        stop_ok = self.stop is None or (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop))
        _check(stop_ok, "stop", "None (the config's) or a tuple of non-empty strings", self.stop)
        _check(self.constraint is None or isinstance(self.constraint, Constraint), "constraint", "None or a Constraint", self.constraint)
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs", "None or an integer >= 0", self.logprobs)


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the policy's raw distribution: softmax of its logits at temperature 1,
    before top-p, top-k and any grammar mask (vLLM's default, ``raw_logprobs``)."""

    token: int
    text: str
    """The token alone, decoded."""
    logprob: float


@dataclass(frozen=True)
class PositionLogprobs:
    """One response position: the token the response has there and the most likely tokens there."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]
    """The ``Request.logprobs`` most likely tokens, most likely first."""


@dataclass
class Result:
    """The decoded response of one request."""

    text: str
    """The response text, cut before the first stop string."""
    token_ids: list[int]
    """The response tokens (after any stop-string cut, a token that straddles it is kept)."""
    finish_reason: FinishReason
    """``stop`` (end of sequence or stop string) or ``length`` (max_new_tokens)."""
    stats: Stats
    reward: float | None = None
    """The reward of the final response, when the method scored it."""
    answer: str | None = None
    """The answer extracted from the text (used by self-consistency and the benchmarks)."""
    trace: list[PositionRecord] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    """For bon / sc / weighted_bon: every sample's text, answer and reward."""
    logprobs: list[PositionLogprobs] | None = None
    """One per response token when the request asked (``Request.logprobs``), else None."""


TokenCallback = Callable[[int, str], None]
"""``on_token(request_index, text_delta)``: committed text, already safe from stop strings."""

AnswerExtractor = Callable[[str], "str | None"]


@dataclass(frozen=True)
class TextDelta:
    """Streamed: text the decoder committed, safe from stop strings."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Streamed last: the request's result."""

    result: Result


StreamEvent = TextDelta | Finished
"""What a stream yields: text deltas, then one :class:`Finished`."""


def _check(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"Request.{name} must be {expected}, got {value!r:.80}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
