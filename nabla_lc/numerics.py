"""Precision helpers shared by the engine and the rewards."""

from __future__ import annotations

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 values are upcast, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
