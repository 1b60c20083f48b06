"""Process reward (Qwen2.5-Math-PRM style): a 2-class head read at a tag token after each step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import nn
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

from ..numerics import upcast
from ..tensors import freeze
from .transformer import TransformerReward, reply_frame

Aggregation = Literal["sum", "min", "last", "mean"]
AGGREGATIONS: tuple[str, ...] = ("sum", "min", "last", "mean")


class TokenTexts:
    """Each token id's text under ``tokenizer``, decoded once; ids past the tokenizer (padded embedding rows) have none."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        token = int(token)
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token]) if token < len(self.tokenizer) else ""
        return self._texts[token]


def step_ends(texts: Iterable[str], separator: str) -> list[bool]:
    """Whether each token (given as its text) completes an occurrence of ``separator`` in the joined text."""
    pending, ends = "", []
    for text in texts:
        pending += text
        found = pending.find(separator)
        ends.append(found >= 0)
        while found >= 0:  # why: keep only the text after the last separator, so the scan stays linear
            pending = pending[found + len(separator) :]
            found = pending.find(separator)
    return ends


def aggregate(step_scores: torch.Tensor, how: Aggregation) -> torch.Tensor:
    """One reward from per-step scores [S]: ``sum`` (paper App. B.2), ``min``, ``last`` or ``mean``."""
    if how == "sum":
        return step_scores.sum()
    if how == "min":
        return step_scores.min()
    if how == "last":
        return step_scores[-1]
    if how == "mean":
        return step_scores.mean()
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


class ProcessReward(TransformerReward):
    """Per-step P(positive) of a 2-class head at a step tag, aggregated over the steps.

    A step ends after the response token whose text completes an occurrence of ``step_separator``;
    the tag follows that token, and one more follows the last token when the response does not end
    on a separator. The separator text itself stays in the input, so every response token (and its
    gradient) reaches the reward; Qwen's reference code replaces it by the tag instead. During DTO
    the steps follow the current argmax tokens, and tags enter as fixed one-hots.
    """

    kind = "process"
    read_last = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        policy_tokenizer: Any | None = None,
        *,
        step_separator: str = "\n\n",
        step_tag: str = "<extra_0>",
        aggregation: Aggregation = "sum",
        system: str | None = None,
        vocab_bridge: bool = False,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not step_separator:
            raise ValueError("step_separator is empty")
        tag = tokenizer(step_tag, add_special_tokens=False)["input_ids"]
        if len(tag) != 1:
            raise ValueError(f"the step tag {step_tag!r} is {len(tag)} tokens in the reward vocabulary; it must be one")
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(model).__name__} has no `score` head")
        self.model = freeze(model)
        self.head: nn.Module = head
        self.step_separator = step_separator
        self.tag_id = int(tag[0])
        self.aggregation: Aggregation = aggregation
        self.system = system
        super().__init__(model.base_model, tokenizer, policy_tokenizer, vocab_bridge)
        self._texts = TokenTexts(self.policy_tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        policy_tokenizer: Any | None = None,
        trust_remote_code: bool = False,
        **kw: Any,
    ) -> "ProcessReward":
        """Load a token-classification checkpoint (2 labels), or a remote-code PRM with ``trust_remote_code``.

        Qwen2.5-Math-PRM ships its own model class (``Qwen2ForProcessRewardModel``), which runs code
        from the checkpoint directory; it loads only with ``trust_remote_code=True``.
        """
        config_file = Path(path) / "config.json"
        auto_map = json.loads(config_file.read_text()).get("auto_map") if config_file.is_file() else None
        if auto_map:
            if not trust_remote_code:
                raise ValueError(
                    f"{path} defines its own model class ({auto_map.get('AutoModel', auto_map)}), which runs code "
                    "from the checkpoint; pass trust_remote_code=True to load it"
                )
            model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=True, local_files_only=True)
        else:
            model = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, policy_tokenizer, **kw)

    def check_vocab(self, policy_tokenizer: Any) -> None:
        if policy_tokenizer is not self.policy_tokenizer:
            self._texts = TokenTexts(policy_tokenizer)
        super().check_vocab(policy_tokenizer)

    def frame(self, prompt: str) -> tuple[list[int], list[int]]:
        return reply_frame(self.tokenizer, self.system, prompt, add_special_tokens=True)

    def step_ends(self, response: Sequence[int]) -> list[bool]:
        """Whether each response token (policy id) completes an occurrence of the step separator."""
        return step_ends(map(self._texts, response), self.step_separator)

    def response_slots(self, response: Sequence[int], final: bool) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        src: list[int] = []
        reads: list[int] = []
        ends = self.step_ends(response)
        for j, end in enumerate(ends):
            ids.append(-1)
            src.append(j)
            if end:
                reads.append(len(ids))
                ids.append(self.tag_id)
                src.append(-1)
        if final and (not ends or not ends[-1]):
            reads.append(len(ids))
            ids.append(self.tag_id)
            src.append(-1)
        return ids, src, reads

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [S, H] at the tags -> P(positive) per step
        return upcast(self.head(hidden)).softmax(-1)[:, 1]

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, self.aggregation)
