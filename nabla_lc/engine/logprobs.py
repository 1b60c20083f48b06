"""Log-probabilities of a sampled response, from the raw policy logits its rollout kept (no extra model pass)."""

from __future__ import annotations

from typing import Sequence

import torch

from .policy import Policy
from .types import PositionLogprobs, TokenLogprob


def position_logprobs(policy: Policy, logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[PositionLogprobs]:
    """Each token's log-probability under softmax(logits) and the ``top`` most likely tokens at its position.

    logits: [L, V] raw policy logits (temperature 1, before top-p, top-k and grammar masks); tokens: [L].
    """
    if len(tokens) != logits.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but logits for {logits.shape[0]} positions")
    if not tokens:
        return []
    logp = logits.float().log_softmax(-1)  # [L, V]
    chosen = logp.gather(-1, torch.tensor(list(tokens), device=logp.device)[:, None])[:, 0].tolist()
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)  # [L, k]
    values_l, ids_l = values.tolist(), ids.tolist()  # why: one device sync for the whole response
    return [
        PositionLogprobs(
            TokenLogprob(token, policy.token_text(token), value),
            tuple(TokenLogprob(t, policy.token_text(t), v) for t, v in zip(top_ids, top_values)),
        )
        for token, value, top_ids, top_values in zip(tokens, chosen, ids_l, values_l)
    ]
