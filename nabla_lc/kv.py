"""The KV cache: every operation on a model's key and value entries lives here, and nothing else touches them.

A cache holds one row per sequence and one column per token; the entries of row b are [H, columns, D] a layer.
Batches keep their rows left-padded (a row's real entries are its last columns, the attention mask says which).
Callers hand :class:`Cache` to a model's forward (``cache=``) and change it only through these functions, which
speak of rows and columns, never of layers: a preallocated or paged store can replace the dense tensors below
behind the same names.

Today's store is transformers' :class:`~transformers.DynamicCache` with plain layers (one [B, H, L, D] key and value
tensor a layer). Every function keeps the tensors' values exactly (views, concatenations with zeros, clones), so a
cache built through them gives the same next-token logits as a fresh encoding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .tensors import cat_left_padded, pad_left

Cache = DynamicCache
"""What a model's forward fills and reads (``cache=``)."""


def empty() -> Cache:
    """A fresh cache for a forward to fill: plain layers, which keep every entry (sliding windows are left to the
    attention mask), so its rows can be stacked and merged."""
    return DynamicCache()


def shapes(cache: Cache) -> list[tuple[int, ...]]:
    """The [B, H, L, D] shape of each layer's keys (for checks: every layer holds the same rows and columns)."""
    return [tuple(layer.keys.shape) for layer in cache.layers]


def _with(cache: Cache, tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Cache:
    """A new cache object like ``cache`` holding ``tensors`` (a key and a value tensor a layer); ``cache`` is not touched."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer, (keys, values) in zip(out.layers, tensors):
        layer.keys, layer.values = keys, values
    return out


def head(cache: Cache, n: int) -> Cache:
    """A cache of the first ``n`` columns (views: a pass that extends a cache replaces its tensors, never writes them)."""
    return _with(cache, [(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in cache.layers])


def copy_row(cache: Cache, row: int, n: int) -> Cache:
    """Row ``row``'s last ``n`` columns (its real entries in a left-padded batch), copied out as a one-row cache."""
    width = cache.layers[0].keys.shape[2]
    return _with(cache, [(layer.keys[row : row + 1, :, width - n :].clone(), layer.values[row : row + 1, :, width - n :].clone()) for layer in cache.layers])


def select_rows(cache: Cache, index: torch.Tensor) -> None:
    """Keep only the rows ``index`` ([K] long), in that order, in place."""
    cache.batch_select_indices(index)


def trim_left(cache: Cache, first: int) -> None:
    """Drop the first ``first`` columns of every row, in place (views)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def merge_rows(cache: Cache, new: Cache) -> None:
    """Append ``new``'s rows after ``cache``'s, both left-padded to the longer's columns, in place.

    Layer by layer (one layer's copy at a time); if a layer fails, the layers merged before it are cut back to the
    cache's own rows and columns (views), so the cache is as it was and the error propagates."""
    rows, _, columns, _ = cache.layers[0].keys.shape
    width = max(columns, new.layers[0].keys.shape[2])
    merged = 0
    try:
        for old_layer, new_layer in zip(cache.layers, new.layers):
            keys, values = cat_left_padded(old_layer.keys, new_layer.keys), cat_left_padded(old_layer.values, new_layer.values)
            old_layer.keys, old_layer.values = keys, values
            merged += 1
    except BaseException:
        for layer in cache.layers[:merged]:
            layer.keys, layer.values = layer.keys[:rows, :, width - columns :], layer.values[:rows, :, width - columns :]
        raise


@dataclass(frozen=True)
class Snapshot:
    """A cache's entries at one moment (a prefix's), to put back after passes that extend it."""

    cache: Cache
    tensors: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def take(cls, cache: Cache) -> "Snapshot":
        return cls(cache, [(layer.keys, layer.values) for layer in cache.layers])

    def restore(self) -> None:
        """Put the snapshot back: drops what later passes appended, and the autograd graph attached to it."""
        for layer, (keys, values) in zip(self.cache.layers, self.tensors):
            layer.keys, layer.values = keys, values

    @property
    def columns(self) -> int:
        """Columns held (0 for a cache no pass has filled)."""
        return self.tensors[0][0].shape[2] if self.tensors else 0


def stack(snapshots: Sequence[Snapshot]) -> tuple[Cache, torch.Tensor]:
    """One batch's cache from one-row snapshots of different lengths, each left-padded to the longest, and the [B, P]
    mask of their real entries. The snapshots' own caches are not touched.

    Only plain layers (a cache from :func:`empty`) can be stacked; others raise TypeError."""
    for layer in snapshots[0].cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"kv.stack needs plain DynamicLayer caches, got {type(layer).__name__}: build the prefix caches with kv.empty()"
            )
    lengths = [s.columns for s in snapshots]
    width = max(lengths)
    layers = range(len(snapshots[0].tensors))
    cache = _with(
        snapshots[0].cache,
        [(torch.cat([pad_left(s.tensors[i][0], width) for s in snapshots]), torch.cat([pad_left(s.tensors[i][1], width) for s in snapshots])) for i in layers],
    )
    device = snapshots[0].tensors[0][0].device
    mask = torch.stack([torch.arange(width, device=device) >= width - n for n in lengths]).long()
    return cache, mask
