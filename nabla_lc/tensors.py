"""Torch helpers the engine and the rewards share: frozen inference modules and KV-cache snapshots."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


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
