"""A reward that shares the policy's backbone: a LoRA adapter plus a scalar head, on only for reward passes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..tensors import freeze
from .base import file_identity
from .process import AGGREGATIONS, Aggregation, TokenTexts, aggregate, step_ends
from .transformer import Layout, TransformerReward, exact_vocab, reply_frame

log = logging.getLogger(__name__)

ADAPTER = "nabla_reward"
"""Name of the injected adapter inside the policy model."""
FORMAT = "nabla-lc-lora-reward"
MAX_SCALING = 1000.0
"""The largest alpha / rank a file may hold (its own files hold 2): past it the adapter's update swamps the
layer's output, and near fp32's range (alpha 1e308) every reward is NaN."""
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


class LoRAReward(TransformerReward):
    """A scalar head on the last hidden state of the policy's backbone with a LoRA adapter switched on.

    The adapter is injected in place into ``policy_model`` (it stays the same object and class), so the
    backbone weights are held once. The adapter is off except inside :meth:`adapter`, which every reward
    pass enters: policy passes see exactly the original model.

    An outcome reward reads the head once, after the chat template's end of turn. With ``step_separator`` it is
    a process reward: the head is read at the last token of every step (the token that completes a separator)
    and at the response's last token, each read the logit of P(the response will be judged correct) given the
    response up to there, and the reads are aggregated (``aggregation``). The reads sit on response tokens, so
    a partial response is scored natively and every token's gradient reaches the reward.
    """

    head_kind = "scalar"
    """How the score is read: ``scalar`` (a linear head on the hidden states) or ``implicit``
    (:class:`~nabla_lc.rewards.implicit.ImplicitLoRAReward`, the policy's own output layer, no head)."""

    def __init__(
        self,
        policy_model: nn.Module,
        tokenizer: Any,
        *,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGETS,
        system: str | None = None,
        step_separator: str | None = None,
        aggregation: Aggregation = "last",
    ) -> None:
        if any(ADAPTER in getattr(m, "lora_A", {}) for m in policy_model.modules()):
            raise ValueError("the policy model already carries a LoRA reward adapter")
        if step_separator is not None and not step_separator:
            raise ValueError("step_separator is empty (None makes an outcome reward)")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.rank, self.alpha, self.target_modules = rank, float(alpha or 2 * rank), tuple(target_modules)
        self.system = system
        self.step_separator = step_separator
        self.aggregation: Aggregation = aggregation
        self.kind = "process" if step_separator is not None else "outcome"
        self.read_last = step_separator is None
        self._texts = TokenTexts(tokenizer)
        freeze(policy_model)
        config = LoraConfig(r=rank, lora_alpha=self.alpha, target_modules=list(self.target_modules), lora_dropout=0.0)
        inject_adapter_in_model(config, policy_model, adapter_name=ADAPTER)
        cast_adapter_dtype(policy_model, ADAPTER)  # why: train and run the adapter in float32 under a bf16 backbone
        self.model = policy_model
        self._layers = [m for m in policy_model.modules() if isinstance(m, BaseTunerLayer)]
        weight = policy_model.get_input_embeddings().weight
        hidden = policy_model.config.get_text_config().hidden_size
        # float32: the head is tiny, keep it exact
        self.head = nn.Linear(hidden, 1).to(weight.device) if self.head_kind == "scalar" else None
        self._depth = 0
        self._trainable = False
        self._switch(False)
        super().__init__(policy_model.base_model, tokenizer, None, vocab_bridge=False)

    # --- the adapter switch ---------------------------------------------------------------
    @contextlib.contextmanager
    def adapter(self) -> Iterator[None]:
        """Switch the adapter on for the enclosed passes (re-entrant); it is off again on exit."""
        if self._depth == 0:
            self._switch(True)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._switch(False)

    def reward_pass(self) -> contextlib.AbstractContextManager[None]:
        return self.adapter()

    def _switch(self, on: bool) -> None:
        for layer in self._layers:
            layer.enable_adapters(on)  # peft also flips requires_grad here; restored below
        for p in self.adapter_parameters():
            p.requires_grad_(self._trainable)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights (not the head)."""
        return [p for name, p in self.model.named_parameters() if f".{ADAPTER}." in name]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights and the head's."""
        return [*self.adapter_parameters(), *(self.head.parameters() if self.head is not None else ())]

    def trainable(self, on: bool) -> None:
        """Let the adapter and head take gradients (training) or freeze them (inference)."""
        self._trainable = on
        for p in self.trainable_parameters():
            p.requires_grad_(on)

    # --- TransformerReward ----------------------------------------------------------------
    def check_vocab(self, policy_tokenizer: Any) -> None:
        exact_vocab(policy_tokenizer, self.tokenizer, type(self).__name__)

    def frame(self, prompt: str) -> tuple[list[int], list[int]]:
        return reply_frame(self.tokenizer, self.system, prompt, add_special_tokens=False)

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self.head(hidden.float())[:, 0]

    def response_slots(self, response: Sequence[int], final: bool) -> tuple[list[int], list[int], list[int]]:
        ids, src, reads = super().response_slots(response, final)
        if self.step_separator is None:
            return ids, src, reads
        ends = step_ends(map(self._texts, response), self.step_separator)
        reads = [j for j, end in enumerate(ends) if end]
        if final and ends and not ends[-1]:
            reads.append(len(ends) - 1)
        return ids, src, reads

    def layout(self, prompt: str, response: Sequence[int], final: bool = True) -> Layout:
        lay = super().layout(prompt, response, final)
        if final and not lay.reads:  # why: an empty response has no step; read it as an outcome reward would
            return Layout(lay.ids, lay.source, [len(lay.ids) - 1])
        return lay

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        return values[-1] if self.step_separator is None else aggregate(values, self.aggregation)

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the adapter and head to one safetensors file."""
        path = Path(path)
        tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if f".{ADAPTER}." in n}
        tensors.update({f"head.{n}": p.detach().cpu().contiguous() for n, p in _head_parameters(self)})
        settings: dict[str, Any] = {
            "rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules), "system": self.system, "head": self.head_kind,
        }
        if self.step_separator is not None:
            settings.update(step_separator=self.step_separator, aggregation=self.aggregation)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": FORMAT, "settings": json.dumps(settings)})
        log.info("saved the LoRA reward (%d tensors) to %s", len(tensors), path)
        return path

    @staticmethod
    def load(path: str | Path, policy_model: nn.Module, tokenizer: Any) -> "LoRAReward":
        """A reward from a file written by :meth:`save` (of the kind its ``head`` setting names), injected into
        ``policy_model``."""
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (why: safe_open cannot be iterated)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a nabla-lc LoRA reward file")
        settings = _checked_settings(path, metadata.get("settings"), shapes)
        reward = _kinds()[settings.pop("head", "scalar")](policy_model, tokenizer, **settings)
        tensors = load_file(str(path))
        params = {f"lora.{n}": p for n, p in policy_model.named_parameters() if f".{ADAPTER}." in n}
        params.update({f"head.{n}": p for n, p in _head_parameters(reward)})
        if set(params) != set(tensors):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise ValueError(f"{path} does not fit this policy model (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, p in params.items():  # why: copy_ would broadcast a (1, 1) head over (1, 576) and score silently wrong
            if tensors[name].shape != p.shape:
                raise ValueError(f"{path} does not fit this policy model: {name} is {tuple(tensors[name].shape)}, the model's is {tuple(p.shape)}")
            if not bool(torch.isfinite(tensors[name]).all()):
                raise ValueError(f"{path} is not a valid nabla-lc LoRA reward file: {name} holds values that are not finite")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        reward.name = file_identity(path)
        return reward


def _head_parameters(reward: LoRAReward) -> list[tuple[str, nn.Parameter]]:
    return list(reward.head.named_parameters()) if reward.head is not None else []


def _checked_settings(path: str | Path, text: str | None, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A file's LoRA settings, checked against its own tensors before anything is allocated from them.

    why: the metadata is free text; a 236-byte file claiming rank 1e8 once made the loader allocate 12.8 GB.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid nabla-lc LoRA reward file: {why}")

    try:
        settings = json.loads(text or "")
    except json.JSONDecodeError:
        raise bad("its settings are not JSON") from None
    if not isinstance(settings, dict) or not set(settings) <= {"rank", "alpha", "target_modules", "system", "step_separator", "aggregation", "head"}:
        raise bad(f"unexpected settings {settings!r:.200}")
    separator, aggregation = settings.get("step_separator"), settings.get("aggregation", "last")
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise bad(f"step_separator must be a non-empty string, got {separator!r:.50}")
    if aggregation not in AGGREGATIONS:
        raise bad(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r:.50}")
    if settings.get("head", "scalar") not in _kinds():
        raise bad(f"head must be one of {sorted(_kinds())}, got {settings['head']!r:.50}")
    rank, alpha, targets, system = (settings.get(k) for k in ("rank", "alpha", "target_modules", "system"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad(f"rank must be an integer >= 1, got {rank!r:.50}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
        raise bad(f"alpha must be a finite number, got {alpha!r:.50}")
    if alpha is not None and not 0 <= alpha <= MAX_SCALING * rank:
        raise bad(f"alpha must be in [0, {MAX_SCALING:g} * rank] (LoRA scales its update by alpha / rank), got {alpha!r:.50}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise bad(f"target_modules must be a list of module names, got {targets!r:.100}")
    if system is not None and not isinstance(system, str):
        raise bad(f"system must be a string, got {type(system).__name__}")
    ranks = {shape[0] for name, shape in shapes.items() if ".lora_A." in name} | {
        shape[-1] for name, shape in shapes.items() if ".lora_B." in name
    }
    if ranks != {rank}:
        raise bad(f"its settings say rank {rank}, its LoRA tensors have rank {sorted(ranks) or 'none'}")
    return settings


def _kinds() -> dict[str, type[LoRAReward]]:
    from .implicit import ImplicitLoRAReward  # why: the implicit reward subclasses this module's class

    return {"scalar": LoRAReward, "implicit": ImplicitLoRAReward}
