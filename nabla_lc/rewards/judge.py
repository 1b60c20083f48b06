"""The policy as its own judge: log p("Yes") - log p("No") after a judge question."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..numerics import upcast
from ..tensors import freeze
from .transformer import SENTINEL, TransformerReward, chat_frame, exact_vocab

JUDGE_QUESTION = "Is this answer correct? Answer Yes or No."


class SelfJudgeReward(TransformerReward):
    """The policy model, asked ``judge_template`` after its answer, scores ``log p(yes) - log p(no)``.

    The conversation is ``user: prompt / assistant: response / user: judge_template`` followed by the
    generation prompt; the score is read at the next token. No extra weights: the policy model is shared.
    """

    kind = "outcome"

    def __init__(
        self,
        policy_model: nn.Module,
        tokenizer: Any,
        judge_template: str = JUDGE_QUESTION,
        yes: str = "Yes",
        no: str = "No",
    ) -> None:
        self.model = freeze(policy_model)
        self.judge_template = judge_template
        self.yes_id, self.no_id = (self._single_token(tokenizer, word) for word in (yes, no))
        out = policy_model.get_output_embeddings()
        if out is None:
            raise ValueError(f"{type(policy_model).__name__} has no output embeddings")
        self.output: nn.Module = out
        self.softcap = getattr(policy_model.config, "final_logit_softcapping", None)
        super().__init__(policy_model.base_model, tokenizer, None, vocab_bridge=False)

    @staticmethod
    def _single_token(tokenizer: Any, word: str) -> int:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the judge answer {word!r} is {len(ids)} tokens; pick a word that is one token")
        return int(ids[0])

    def check_vocab(self, policy_tokenizer: Any) -> None:
        exact_vocab(policy_tokenizer, self.tokenizer, type(self).__name__)

    def frame(self, prompt: str) -> tuple[list[int], list[int]]:
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": SENTINEL},
            {"role": "user", "content": self.judge_template},
        ]
        return chat_frame(self.tokenizer, messages, add_special_tokens=False, add_generation_prompt=True)

    def read(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [R, H]; only the two answer rows of the output layer are needed
        rows = torch.tensor([self.yes_id, self.no_id], device=hidden.device)
        bias = self.output.bias[rows] if getattr(self.output, "bias", None) is not None else None
        logits = upcast(nn.functional.linear(hidden, self.output.weight[rows], bias))  # [R, 2]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, 0] - logits[:, 1]
