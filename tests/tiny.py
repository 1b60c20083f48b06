"""Tiny random-weight models and a character tokenizer, built in-process (no network)."""

from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from nabla_lc.rewards.base import RewardAdapter, RewardPrefix, Scores, SoftScore

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=?.,:;!()[]{}\\$#'\"\n_<>|")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chars: Sequence[str] = CHARS, specials: Sequence[str] = SPECIALS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template."""
    vocab = {t: i for i, t in enumerate(list(specials) + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "</s>"]
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def make_policy(tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer causal LM over the tokenizer's vocabulary (padded by 3 rows, as real checkpoints often are)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # why: random init is nearly uniform; sharpen so sampling has structure
        model.lm_head.weight.mul_(40.0)
    return model.to(dtype).eval()


class LinearReward(RewardAdapter):
    """r(y) = mean_t y_t · w: a cheap differentiable stand-in where a transformer reward is not the point."""

    def __init__(self, vocab_size: int, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(vocab_size, generator=g)

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> Scores:
        values = torch.tensor([float(self.w[list(r)].mean()) if len(r) else 0.0 for r in responses])
        return Scores(values, len(responses), sum(len(r) for r in responses))

    def prepare(self, prompt: str, committed: Sequence[int]) -> RewardPrefix:
        return RewardPrefix(list(committed), 0, 0)

    def score_soft(self, prefix: RewardPrefix, y: torch.Tensor) -> SoftScore:
        committed = prefix.state
        w = self.w.to(y.dtype)
        total = (y @ w).sum() + (w[committed].sum() if committed else 0.0)
        return SoftScore(total / (len(committed) + y.shape[0]), 1, len(committed) + y.shape[0])


def make_classifier_reward(
    tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 1, dtype: torch.dtype = torch.float32, sliding_window: int | None = None
):
    """A 2-layer one-label sequence classifier over the same vocabulary, as a SequenceClassifierReward; with
    ``sliding_window`` (qwen2 only), both layers attend to that many tokens only."""
    from transformers import LlamaForSequenceClassification, Qwen2ForSequenceClassification

    from nabla_lc.rewards import SequenceClassifierReward

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )
    cls, config = (LlamaForSequenceClassification, LlamaConfig) if arch == "llama" else (Qwen2ForSequenceClassification, Qwen2Config)
    if sliding_window is not None:
        common.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=0)
    model = cls(config(**common)).to(dtype).eval()
    return SequenceClassifierReward(model, tokenizer, tokenizer)


def make_engine(tokenizer: PreTrainedTokenizerFast | None = None):
    """A tiny llama policy with a tiny sequence-classifier reward over the same vocabulary; short responses.

    The same engine in every process (seeded weights), so Ray workers and replicas can build it themselves.
    """
    from nabla_lc import Engine, NablaConfig

    tokenizer = tokenizer or make_tokenizer()
    return Engine(make_policy(tokenizer, "llama"), tokenizer, make_classifier_reward(tokenizer), NablaConfig(max_new_tokens=24))
