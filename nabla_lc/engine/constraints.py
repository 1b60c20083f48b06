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

A response cut by ``max_new_tokens`` or a stop string can end inside the grammar (an unfinished JSON object);
give the grammar room.
"""

from __future__ import annotations

import json
import weakref
from typing import TYPE_CHECKING, Sequence

import torch

from .types import Constraint

if TYPE_CHECKING:
    import xgrammar

    from .policy import Policy

_COMPILERS: "weakref.WeakKeyDictionary[Policy, xgrammar.GrammarCompiler]" = weakref.WeakKeyDictionary()
"""One compiler per policy (it holds the tokenizer's vocabulary and xgrammar's cache of compiled grammars)."""


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
        message = str(err).strip().split("\n")[0]
        raise ValueError(f"Request.constraint ({constraint.kind}) does not compile: {message}") from None


class Grammar:
    """The parse state of one response under a constraint: masks the next token, accepts sampled tokens."""

    def __init__(self, matcher: "xgrammar.GrammarMatcher", vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    @classmethod
    def start(cls, policy: "Policy", constraint: Constraint) -> "Grammar":
        """The state before the first response token."""
        import xgrammar as xgr

        return cls(xgr.GrammarMatcher(compile_constraint(policy, constraint)), policy.vocab_size)

    def fork(self, head: Sequence[int] = ()) -> "Grammar":
        """An independent copy, advanced over ``head``."""
        forked = Grammar(self.matcher.fork(), self.vocab_size)
        forked.accept(head)
        return forked

    def accept(self, tokens: Sequence[int]) -> None:
        """Advance over tokens; a token outside the grammar is a bug in the caller and raises."""
        for token in tokens:
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(f"token {int(token)} is outside the grammar at this point")

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask)
        probe = torch.zeros(1, self.vocab_size)
        xgr.apply_token_bitmask_inplace(probe, bitmask)
        return probe[0] == 0


def masked(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with disallowed tokens at the dtype's lowest finite value. logits, allowed: [..., V].

    Why finite rather than -inf: entropies, KLs and softmaxes of the result stay free of NaN (0 · log 0),
    while the masked tokens still get probability exactly 0 (exp underflows) and never win an argmax.
    """
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
