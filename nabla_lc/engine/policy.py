"""The policy model: prompt templating, token text, embeddings, and frozen inference mode."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..tensors import freeze

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class Policy:
    """A causal LM and its tokenizer, as the engine uses them."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, max_length: int | None = None) -> None:
        self.model = freeze(model)
        self.tokenizer = tokenizer
        weight = model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor), "the input embedding has no weight matrix"
        self.embedding = weight  # [V, H]
        self.vocab_size = int(self.embedding.shape[0])
        self.device = self.embedding.device
        self.dtype = self.embedding.dtype
        config_max = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or config_max or 4096)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)

    def room(self, prompt_ids: Sequence[int]) -> int:
        """The response tokens the context leaves after ``prompt_ids``; ``ValueError`` when the prompt is empty or
        fills the context."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.max_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, which fills the model's context of {self.max_length}")
        return room

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template renders tools (:func:`template_renders_tools`), checked once per policy."""
        return template_renders_tools(self.tokenizer)

    def template(self, prompt: str, system: str | None = None, chat: bool = True) -> list[int]:
        """Token ids of a prompt: the chat template with a generation prompt, or the plain text."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.template_messages(messages)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)

    def template_messages(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation under the tokenizer's chat template, ready for the assistant's turn.

        ``tools`` (OpenAI-style function definitions) are passed to the template, which renders them if it has a
        tool section (:func:`template_renders_tools`).
        """
        extra = {"tools": list(tools)} if tools else {}
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **extra)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([int(token)])


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        log.warning("the policy defines no end-of-sequence token; decoding stops on length and stop strings only")
    return ids


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders the ``tools`` it is given (Qwen2.5's and Llama 3.1's do;
    SmolLM2's ignores them). Checked by rendering a probe tool, not by reading the template."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        return False
    name = "nabla_lc_probe_tool"
    tool = {"type": "function", "function": {"name": name, "description": "probe", "parameters": {"type": "object", "properties": {}}}}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[tool], tokenize=False, add_generation_prompt=True)
    return name in text
