"""The policy -> reward vocabulary map: identity, exact remapping, errors, and the embedding bridge."""

from __future__ import annotations

import logging
from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nabla_lc.rewards import VocabMismatchError, check_vocab

WORDS = ["<unk>", "hello", "hi", "yes", "no", "the", "answer", "is", "five"]
H = 6


def words(vocab: Sequence[str], added: Sequence[str] = (), unk: str = "<unk>") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with ids in the order of ``vocab``, plus added special tokens."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=unk)
    tok.add_tokens(list(added), special_tokens=True)
    return tok


def chars() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over lowercase letters."""
    vocab = ["[UNK]", *"abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("\\S"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def table(n: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, H)


def test_identical_vocabularies_are_the_identity() -> None:
    vocab = check_vocab(words(WORDS), words(WORDS))
    assert vocab.kind == "identity" and vocab.coverage == 1.0
    E = table(len(WORDS) + 3)  # reward rows beyond its tokenizer (padding)
    y = torch.softmax(torch.randn(4, len(WORDS) + 5), -1)  # policy rows beyond its tokenizer (padding)
    torch.testing.assert_close(vocab.embed(y, E), y[:, : len(WORDS)] @ E[: len(WORDS)])
    ids = torch.tensor([1, 2, len(WORDS) + 2])  # the last is a padding row: zero vector
    expected = torch.stack([E[1], E[2], torch.zeros(H)])
    torch.testing.assert_close(vocab.embed_ids(ids, E), expected)


def test_permuted_ids_remap_exactly() -> None:
    policy = words(WORDS[:1] + WORDS[1:][::-1])
    reward = words(WORDS)
    vocab = check_vocab(policy, reward)
    assert vocab.kind == "remap" and vocab.coverage == 1.0
    E = table(len(WORDS))
    p_ids = policy("hello the answer", add_special_tokens=False)["input_ids"]
    r_ids = reward("hello the answer", add_special_tokens=False)["input_ids"]
    assert p_ids != r_ids
    torch.testing.assert_close(vocab.embed_ids(torch.tensor(p_ids), E), E[r_ids])
    torch.testing.assert_close(vocab.embed(F.one_hot(torch.tensor(p_ids), len(WORDS)).float(), E), E[r_ids])
    M = vocab.input_matrix(E)
    assert M.shape == (len(WORDS), H)
    y = torch.softmax(torch.randn(3, len(WORDS)), -1)
    torch.testing.assert_close(vocab.embed(y, E), y @ M)


def test_extra_special_tokens_on_the_reward_side_keep_the_identity() -> None:
    # a Qwen2.5 policy with a Qwen3 reward: the reward tokenizer appends four added tokens
    extra = ["<think>", "</think>", "<tool_response>", "</tool_response>"]
    vocab = check_vocab(words(WORDS, ["<|im_end|>"]), words(WORDS, ["<|im_end|>", *extra]))
    assert vocab.kind == "identity"


def test_extra_special_tokens_on_the_policy_side_map_to_zero(caplog: pytest.LogCaptureFixture) -> None:
    policy = words(WORDS, ["<think>", "</think>"])
    with caplog.at_level(logging.WARNING, logger="nabla_lc.rewards.vocab"):
        vocab = check_vocab(policy, words(WORDS))
    assert vocab.kind == "remap" and "2 added policy tokens" in caplog.text
    E = table(len(WORDS))
    think = policy.convert_tokens_to_ids("<think>")
    torch.testing.assert_close(vocab.embed_ids(torch.tensor([1, think]), E), torch.stack([E[1], torch.zeros(H)]))
    y = F.one_hot(torch.tensor([1, think]), len(policy)).float()
    torch.testing.assert_close(vocab.embed(y, E), vocab.embed_ids(torch.tensor([1, think]), E))


def test_disjoint_vocabularies_raise_with_coverage() -> None:
    with pytest.raises(VocabMismatchError, match=r"covers 0\.0% of the policy's 9 tokens") as err:
        check_vocab(words(WORDS), words(["[UNK]", "alpha", "beta"], unk="[UNK]"))
    assert "vocab_bridge=True" in str(err.value) and "'hello'" in str(err.value)


def test_partial_overlap_raises_with_coverage() -> None:
    with pytest.raises(VocabMismatchError, match=r"covers 50\.0%"):
        check_vocab(words(["<unk>", "a", "b", "c"]), words(["<unk>", "a", "x", "y"]))


def test_bridge_means_the_reward_embeddings_of_the_token_text(caplog: pytest.LogCaptureFixture) -> None:
    policy, reward = words(WORDS), chars()
    with caplog.at_level(logging.WARNING, logger="nabla_lc.rewards.vocab"):
        vocab = check_vocab(policy, reward, bridge=True)
    assert vocab.kind == "bridge" and "vocabulary bridge" in caplog.text
    E = table(len(reward))
    hello = reward("hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 5
    torch.testing.assert_close(vocab.embed_ids(torch.tensor([1]), E)[0], E[hello].mean(0))
    y = torch.softmax(torch.randn(3, len(policy) + 2), -1)
    torch.testing.assert_close(vocab.embed(y, E), y[:, : len(policy)] @ vocab.input_matrix(E))
    one_hot = F.one_hot(torch.tensor([1, 3, 8]), len(policy)).float()
    torch.testing.assert_close(vocab.embed(one_hot, E), vocab.embed_ids(torch.tensor([1, 3, 8]), E))
