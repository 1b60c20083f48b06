"""Outcome reward from a sequence classifier with one label (Skywork-Reward-V2 style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..numerics import upcast
from ..tensors import freeze
from .transformer import TransformerReward, reply_frame


class SequenceClassifierReward(TransformerReward):
    """``logits[0][0]`` of a one-label sequence classifier over the chat ``user: prompt / assistant: response``.

    The score is the classification head at the last token of the templated conversation, the
    template's duplicated BOS removed, as in the Skywork-Reward-V2 model cards.
    """

    kind = "outcome"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        policy_tokenizer: Any | None = None,
        *,
        system: str | None = None,
        vocab_bridge: bool = False,
    ) -> None:
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"a sequence-classifier reward needs one label, the model has {model.config.num_labels}")
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(model).__name__} has no `score` head")
        self.model = freeze(model)
        self.head: nn.Module = head
        self.system = system
        super().__init__(model.base_model, tokenizer, policy_tokenizer, vocab_bridge)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        policy_tokenizer: Any | None = None,
        **kw: Any,
    ) -> "SequenceClassifierReward":
        """Load a checkpoint directory (or a model id in the local cache) with its tokenizer."""
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, policy_tokenizer, **kw)

    def frame(self, prompt: str) -> tuple[list[int], list[int]]:
        return reply_frame(self.tokenizer, self.system, prompt, add_special_tokens=True)

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        return upcast(self.head(hidden)[:, 0])
