"""Torch helpers the engine and the rewards share: frozen inference modules, padding (the KV cache is :mod:`nabla_lc.kv`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, every parameter frozen: DTO and the rewards differentiate inputs only."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` ([B, L] or [B, H, L, D]) left-padded with zeros to ``width`` along L."""
    dim = 1 if x.dim() == 2 else 2
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def cat_left_padded(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``old``'s rows, then ``new``'s ([B, L] or [B, H, L, D]), both left-padded to the longer L.

    why: the two differ in length; left-padding the shorter (masked out) lines every row up at its end."""
    dim = 1 if old.dim() == 2 else 2
    width = max(old.shape[dim], new.shape[dim])
    return torch.cat([pad_left(old, width), pad_left(new, width)])


def pad_rows(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ([T_b, H] each) right-padded with zeros into one [B, T, H] batch, and the [B, T] mask of their real entries."""
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    width = int(lengths.max())
    batch = torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], r.shape[1])]) for r in rows])
    return batch, (torch.arange(width, device=rows[0].device)[None] < lengths[:, None]).long()
