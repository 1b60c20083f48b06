"""Feeding policy tokens to a reward model with another vocabulary.

A :class:`VocabMap` is built once per (policy, reward) pair by :func:`check_vocab`. Each policy
token id gets a list of reward token ids with weights:

* identical vocabularies: the identity;
* the same token strings under other ids, or added tokens on one side only: an exact remapping;
* ``bridge=True`` (opt-in): a policy token missing from the reward vocabulary becomes the mean of the
  reward's input embeddings of the reward tokenization of its text.

Policy ids at or beyond ``len(policy_tokenizer)`` (padded embedding rows) map to the zero vector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

MapKind = Literal["identity", "remap", "bridge"]

BRIDGE_OPTION = "vocab_bridge=True"
"""The option name users pass to accept an approximate embedding bridge."""


class VocabMismatchError(ValueError):
    """The policy's tokens do not all exist in the reward's vocabulary."""


@dataclass(frozen=True)
class VocabMap:
    """Policy token id -> weighted reward token ids, and the input vectors that follow from it."""

    kind: MapKind
    pieces: torch.Tensor
    """[V_policy_tokens, K] long: reward ids of each policy token, -1 where empty."""
    weights: torch.Tensor
    """[V_policy_tokens, K] float32: weight of each piece (1 for exact maps, 1/k for a bridged token)."""
    coverage: float
    """Fraction of the policy's tokens whose exact string exists in the reward vocabulary."""
    _columns: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def policy_size(self) -> int:
        """Number of policy token ids the map covers (the policy tokenizer's length)."""
        return int(self.pieces.shape[0])

    def embed(self, y: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Reward input vectors ``y @ M`` of soft policy tokens, without building ``M``.

        y: [L, V] over the policy vocabulary (V >= policy_size; extra padded columns are ignored);
        embedding: [V_reward, H] reward input embeddings. Returns [L, H] in ``embedding.dtype``.
        """
        y = y[:, : self.policy_size].to(embedding.dtype)
        if self.kind == "identity":
            return y @ embedding[: self.policy_size]
        # why: scattering y into reward columns costs L x V_reward; gathering rows of M would copy V x H per call
        spread = y.new_zeros(y.shape[0], embedding.shape[0])
        for rows, cols, w in self._scatter(y.device):
            spread = spread.index_add(1, cols, y[:, rows] * w.to(y.dtype))
        return spread @ embedding

    def _scatter(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per piece slot: policy rows, their reward columns and weights, on ``device`` (computed once per device)."""
        if device not in self._columns:
            slots = []
            for k in range(self.pieces.shape[1]):
                rows = (self.pieces[:, k] >= 0).nonzero()[:, 0]
                slots.append((rows.to(device), self.pieces[rows, k].to(device), self.weights[rows, k].to(device)))
            self._columns[device] = slots
        return self._columns[device]

    def embed_ids(self, ids: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Reward input vectors of hard policy ids; equal to :meth:`embed` of their one-hots.

        ids: [...] long policy ids; returns [..., H].
        """
        inside = ids < self.policy_size
        safe = torch.where(inside, ids, torch.zeros_like(ids)).cpu()
        pieces = self.pieces[safe].to(embedding.device)  # [..., K]
        weights = (self.weights[safe] * inside.cpu()[..., None]).to(embedding.device, embedding.dtype)
        weights = weights * (pieces >= 0)
        vectors = embedding[pieces.clamp(min=0)]  # [..., K, H]
        return (vectors * weights[..., None]).sum(-2)

    def input_matrix(self, embedding: torch.Tensor) -> torch.Tensor:
        """The dense [V_policy_tokens, H_reward] matrix ``M`` with ``embed(y) == y @ M`` (memory: V x H)."""
        return self.embed_ids(torch.arange(self.policy_size, device=embedding.device), embedding)


def check_vocab(policy_tokenizer: Any, reward_tokenizer: Any, bridge: bool = False) -> VocabMap:
    """The map from the policy's vocabulary to the reward's; raises :class:`VocabMismatchError` when not exact.

    Tokens are matched by their token strings. Policy tokens that are *added* tokens (special or
    chat tokens) may be missing on the reward side; they map to the zero vector, with a warning.
    Any other missing token makes the map inexact: an error, or with ``bridge`` an embedding bridge.
    """
    n = len(policy_tokenizer)
    reward_vocab: dict[str, int] = reward_tokenizer.get_vocab()
    policy_tokens = policy_tokenizer.convert_ids_to_tokens(list(range(n)))
    added = set(policy_tokenizer.get_added_vocab())
    index = [reward_vocab.get(t, -1) if t is not None else -1 for t in policy_tokens]
    missing = [i for i in range(n) if index[i] < 0]
    missing_regular = [i for i in missing if policy_tokens[i] not in added]
    coverage = 1.0 - len(missing) / n if n else 1.0

    if not missing_regular:
        if missing:
            log.warning(
                "%d added policy tokens have no reward counterpart and reach the reward as zero vectors: %s",
                len(missing),
                [policy_tokens[i] for i in missing[:8]],
            )
        identity = not missing and all(index[i] == i for i in range(n))
        kind: MapKind = "identity" if identity else "remap"
        if kind == "remap":
            log.info("policy -> reward vocabulary: exact remapping of %d tokens (%d without counterpart)", n, len(missing))
        pieces = torch.tensor(index, dtype=torch.long)[:, None]
        weights = (pieces >= 0).float()
        return VocabMap(kind, pieces, weights, coverage)

    if not bridge:
        examples = ", ".join(repr(policy_tokens[i]) for i in missing_regular[:5])
        raise VocabMismatchError(
            f"the reward vocabulary covers {coverage:.1%} of the policy's {n} tokens; "
            f"{len(missing)} have no exact counterpart (e.g. {examples}). "
            f"Pass {BRIDGE_OPTION} to feed each such token as the mean reward embedding of its text (approximate)."
        )
    return _bridge(policy_tokenizer, reward_tokenizer, index, coverage)


def _bridge(policy_tokenizer: Any, reward_tokenizer: Any, index: list[int], coverage: float) -> VocabMap:
    n = len(index)
    missing = [i for i in range(n) if index[i] < 0]
    texts = [policy_tokenizer.decode([i]) for i in missing]
    encoded = reward_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    lists: list[list[int]] = [[r] if r >= 0 else [] for r in index]
    for i, ids in zip(missing, encoded):
        lists[i] = list(ids)
    width = max(1, max(len(p) for p in lists))
    pieces = torch.full((n, width), -1, dtype=torch.long)
    weights = torch.zeros(n, width)
    for i, ids in enumerate(lists):
        if ids:
            pieces[i, : len(ids)] = torch.tensor(ids)
            weights[i, : len(ids)] = 1.0 / len(ids)
    empty = sum(1 for p in lists if not p)
    log.warning(
        "vocabulary bridge: %.1f%% of %d policy tokens map exactly, %.1f%% through the mean embedding of their text, %d to zero",
        100 * coverage,
        n,
        100 * (len(missing) - empty) / n,
        empty,
    )
    return VocabMap("bridge", pieces, weights, coverage)
