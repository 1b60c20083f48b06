"""Grammar constraints (JSON schema, regex, EBNF) as token masks, compiled with xgrammar.

A :class:`~nabla_lc.engine.types.Constraint` on a request is compiled once per call against the policy's
tokenizer (xgrammar caches compiled grammars). A :class:`Grammar` is one response's parse state: it masks
the next token's logits and accepts each token that is sampled. The decoder keeps one per request, advanced
over the committed tokens, and forks it for every rollout (each rollout row advances its own fork), so a
rollout, and a ∇ proposal drawn from optimized logits under the same mask, never leaves the grammar.
Masking costs no model call: the accounting is unchanged.

Where ∇ looks: a position's entropy and ``differ`` gates see the policy's logits under the mask (a token the
grammar forces has entropy 0 and is committed without a probe); DTO optimizes the policy's own logits, and
the proposal is resampled from the optimized logits under the position's mask. With ``dto_positions="all"``
DTO also optimizes the later positions, and its straight-through passes feed their argmax tokens to the policy
and the reward without a mask: those inner sequences are a relaxation, scored and never committed. Every
committed token is a rollout's token or a proposal, both drawn under the exact mask of the committed prefix,
so the response stays within the grammar whichever positions DTO optimizes.

A JSON response near the end of its token budget is brought to a close (:class:`Closing`). Before each token the
engine measures a short completion of the document from where it stands (:func:`completion_length`: end the
string in progress, close containers, write the smallest values the schema still requires; its characters bound
the tokens it needs). Once that completion needs every token left, a string in progress may only be ended (the
tokens that begin with ``"``) and a container that may end is ended (the tokens that begin with ``}`` or ``]``);
numbers, ``true``/``false`` and required keys and values are still the model's, under the mask. A reply that runs
on inside a string (a small model repeating ``;`` in a ``reasoning`` field) so still parses, and a reply that
fits its budget is not touched. Regex and EBNF grammars have no such rule; a reply cut by a stop string, or one
whose model starts a long value (a number) in the last tokens, can still end inside the grammar: give it room.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

from .types import Constraint

if TYPE_CHECKING:
    import xgrammar

    from .policy import Policy

_COMPILERS: "weakref.WeakKeyDictionary[Policy, xgrammar.GrammarCompiler]" = weakref.WeakKeyDictionary()
"""One compiler per policy (it holds the tokenizer's vocabulary and xgrammar's cache of compiled grammars)."""

_OUTSIDE = '}]0",ftn[{-'
"""The characters :func:`completion_length` tries first outside a string: closers, then the smallest values."""
_PRINTABLE = "".join(map(chr, range(32, 127)))


def compiler(policy: "Policy") -> "xgrammar.GrammarCompiler":
    """The policy's grammar compiler, built on first use."""
    try:
        import xgrammar as xgr  # why: an optional dependency, imported only when a request carries a constraint
    except ImportError as err:
        raise ImportError("Request.constraint needs xgrammar: pip install 'nabla-lc[agents]'") from err

    found = _COMPILERS.get(policy)
    if found is None:
        if not policy.eos_ids:
            raise ValueError("Request.constraint needs a policy with an end-of-sequence token (the grammar's stop token)")
        info = xgr.TokenizerInfo.from_huggingface(policy.tokenizer, vocab_size=policy.vocab_size, stop_token_ids=sorted(policy.eos_ids))
        found = _COMPILERS[policy] = xgr.GrammarCompiler(info, max_threads=1)
    return found


def compile_constraint(policy: "Policy", constraint: Constraint) -> "xgrammar.CompiledGrammar":
    """Compile a constraint for the policy's vocabulary; a bad grammar raises ``ValueError`` naming the field."""
    grammars = compiler(policy)
    try:
        if constraint.kind == "json_schema":
            schema = json.loads(constraint.spec)
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
            return grammars.compile_json_schema(constraint.spec, any_whitespace=False)
        if constraint.kind == "regex":
            return grammars.compile_regex(constraint.spec)
        return grammars.compile_grammar(constraint.spec)
    except (RuntimeError, ValueError) as err:  # why: xgrammar reports a bad grammar as RuntimeError with its C++ location
        raise ValueError(f"Request.constraint ({constraint.kind}) does not compile: {grammar_error(err)}") from None


def grammar_error(err: Exception) -> str:
    """xgrammar's error message: its first line, without the time and C++ location it starts with."""
    return re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", str(err).strip().split("\n")[0])


@dataclass(frozen=True)
class JsonVocab:
    """What the closing rule needs to know of each token of a vocabulary: its bytes and its first byte."""

    text: tuple[bytes, ...]
    """Each token's bytes (special tokens: empty)."""
    quote_first: torch.Tensor
    """[V] bool: the token begins with ``"``."""
    closer_first: torch.Tensor
    """[V] bool: the token begins with ``}`` or ``]``."""

    @classmethod
    def of(cls, policy: "Policy", grammar: "xgrammar.CompiledGrammar") -> "JsonVocab":
        """The policy's (built on first use, from the decoded vocabulary of a grammar compiled for it)."""
        found = _JSON_VOCABS.get(policy)
        if found is None:
            decoded = grammar.tokenizer_info.decoded_vocab
            text = tuple(bytes(decoded[i]) if i < len(decoded) else b"" for i in range(policy.vocab_size))

            def first(chars: bytes) -> torch.Tensor:
                return torch.tensor([t[:1] != b"" and t[0] in chars for t in text], dtype=torch.bool)

            found = _JSON_VOCABS[policy] = cls(text, first(b'"'), first(b"}]"))
        return found


_JSON_VOCABS: "weakref.WeakKeyDictionary[Policy, JsonVocab]" = weakref.WeakKeyDictionary()


def scan(in_string: bool, escaped: bool, data: bytes) -> tuple[bool, bool]:
    """JSON's string state (inside a string, just after a backslash in one) after the bytes ``data``."""
    for byte in data:
        if escaped:
            escaped = False
        elif in_string and byte == 0x5C:  # a backslash
            escaped = True
        elif byte == 0x22:  # a quote
            in_string = not in_string
    return in_string, escaped


def completion_length(matcher: "xgrammar.GrammarMatcher", in_string: bool, escaped: bool, limit: int) -> int:
    """The characters of a short completion of the document from ``matcher``'s state (``limit + 1``: none within ``limit``).

    A fork takes the grammar's forced text, else the first character it accepts: in a string ``"`` first,
    outside one ``}``, ``]``, then the smallest values (:data:`_OUTSIDE`), then any printable character."""
    fork, count = matcher.fork(), 0
    while not fork.is_completed():
        step = fork.find_jump_forward_string()
        if not step:
            order = ('"' if in_string else _OUTSIDE) + _PRINTABLE
            step = next((c for c in order if fork.accept_string(c)), "")
            if not step:
                return limit + 1
        else:
            fork.accept_string(step)
        count += len(step)
        if count > limit:
            return limit + 1
        in_string, escaped = scan(in_string, escaped, step.encode())
    return count


@dataclass(frozen=True)
class Closing:
    """Where a JSON response is in its budget and its text, for the closing rule (see the module docstring)."""

    vocab: JsonVocab
    budget: int
    """The response's most tokens."""
    position: int = 0
    """Response tokens accepted so far."""
    in_string: bool = False
    escaped: bool = False
    """The last byte was a backslash inside a string."""

    def after(self, token: int) -> "Closing":
        """The state after ``token``: one position on, string state updated over its bytes."""
        in_string, escaped = scan(self.in_string, self.escaped, self.vocab.text[token] if token < len(self.vocab.text) else b"")
        return replace(self, position=self.position + 1, in_string=in_string, escaped=escaped)

    def narrow(self, allowed: torch.Tensor, matcher: "xgrammar.GrammarMatcher") -> torch.Tensor:
        """``allowed`` ([V] bool), narrowed once a completion needs every token left; never to nothing."""
        left = self.budget - self.position
        if completion_length(matcher, self.in_string, self.escaped, left) < left:
            return allowed
        narrowed = allowed & (self.vocab.quote_first if self.in_string else self.vocab.closer_first)
        return narrowed if bool(narrowed.any()) else allowed


class Grammar:
    """The parse state of one response under a constraint: masks the next token, accepts sampled tokens."""

    def __init__(self, matcher: "xgrammar.GrammarMatcher", vocab_size: int, closing: Closing | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.closing = closing
        """A JSON response's closing state (None for regex and EBNF grammars)."""

    @classmethod
    def start(cls, policy: "Policy", constraint: Constraint, budget: int) -> "Grammar":
        """The state before the first response token of a response of at most ``budget`` tokens."""
        import xgrammar as xgr

        compiled = compile_constraint(policy, constraint)
        closing = Closing(JsonVocab.of(policy, compiled), budget) if constraint.kind == "json_schema" else None
        return cls(xgr.GrammarMatcher(compiled), policy.vocab_size, closing)

    def fork(self, head: Sequence[int] = ()) -> "Grammar":
        """An independent copy, advanced over ``head``."""
        forked = Grammar(self.matcher.fork(), self.vocab_size, self.closing)
        forked.accept(head)
        return forked

    def accept(self, tokens: Sequence[int]) -> None:
        """Advance over tokens; a token outside the grammar is a bug in the caller and raises."""
        for token in tokens:
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(f"token {int(token)} is outside the grammar at this point")
            if self.closing is not None:
                self.closing = self.closing.after(int(token))

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next (narrowed near a JSON response's budget, see :class:`Closing`);
        ``ValueError`` where it allows none."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask)
        probe = torch.zeros(1, self.vocab_size)
        xgr.apply_token_bitmask_inplace(probe, bitmask)
        allowed = probe[0] == 0
        if not bool(allowed.any()):  # why: a grammar no text satisfies (a pattern that matches nothing) is the request's error
            raise ValueError("Request.constraint allows no token here: no response satisfies it")
        return self.closing.narrow(allowed, self.matcher) if self.closing is not None else allowed


def masked(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with disallowed tokens at the dtype's lowest finite value. logits, allowed: [..., V].

    Why finite rather than -inf: entropies, KLs and softmaxes of the result stay free of NaN (0 · log 0),
    while the masked tokens still get probability exactly 0 (exp underflows) and never win an argmax.
    """
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
