"""Torch helpers the engine and the rewards share: frozen inference modules and KV-cache snapshots."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, every parameter frozen: DTO and the rewards differentiate inputs only."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class CacheSnapshot:
    """A KV cache's per-layer key and value tensors at one moment (a prefix's entries)."""

    cache: DynamicCache
    tensors: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def take(cls, cache: DynamicCache) -> "CacheSnapshot":
        return cls(cache, [(layer.keys, layer.values) for layer in cache.layers])

    def restore(self) -> None:
        """Put the snapshot back: drops what later passes appended, and the autograd graph attached to it."""
        for layer, (keys, values) in zip(self.cache.layers, self.tensors):
            layer.keys, layer.values = keys, values


def pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` ([B, L] or [B, H, L, D]) left-padded with zeros to ``width`` along L."""
    dim = 1 if x.dim() == 2 else 2
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ([T_b, H] each) right-padded with zeros into one [B, T, H] batch, and the [B, T] mask of their real entries."""
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    width = int(lengths.max())
    batch = torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], r.shape[1])]) for r in rows])
    return batch, (torch.arange(width, device=rows[0].device)[None] < lengths[:, None]).long()


def stacked_cache(snapshots: Sequence[CacheSnapshot]) -> tuple[DynamicCache, torch.Tensor]:
    """One batch's KV cache from one-row prefix caches of different lengths, each left-padded to the longest, and
    the [B, P] mask of their real entries. The snapshots' own caches are not touched.

    Only plain :class:`DynamicLayer` layers (a ``DynamicCache()`` built without a config, which keeps every entry and
    leaves sliding windows to the attention mask) can be stacked; others raise TypeError."""
    for layer in snapshots[0].cache.layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(
                f"stacked_cache needs plain DynamicLayer caches, got {type(layer).__name__}: build the prefix caches "
                "with DynamicCache() (without a config)"
            )
    lengths = [s.tensors[0][0].shape[2] if s.tensors else 0 for s in snapshots]
    width = max(lengths)
    cache = copy.copy(snapshots[0].cache)
    cache.layers = [copy.copy(layer) for layer in snapshots[0].cache.layers]
    for i, layer in enumerate(cache.layers):
        layer.keys = torch.cat([pad_left(s.tensors[i][0], width) for s in snapshots])
        layer.values = torch.cat([pad_left(s.tensors[i][1], width) for s in snapshots])
    device = snapshots[0].tensors[0][0].device
    mask = torch.stack([torch.arange(width, device=device) >= width - n for n in lengths]).long()
    return cache, mask
