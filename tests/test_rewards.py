"""Reward adapters on tiny random models built in-process (no network, no weights)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from nabla_lc import cli
from nabla_lc.cli import train as cli_train
from nabla_lc.rewards import (
    ImplicitLoRAReward,
    LoRAReward,
    NoGradientError,
    ProcessReward,
    RewardAdapter,
    SelfJudgeReward,
    SequenceClassifierReward,
    VerifierReward,
    VocabMismatchError,
    aggregate,
)
from nabla_lc.rewards import train as train_mod
from nabla_lc.rewards.transformer import SENTINEL, chat_frame

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
CORPUS = [
    "What is 2 + 3? The answer is 5.\n\nStep one: add the numbers.\n\nStep two: check.",
    "Is this answer correct? Answer Yes or No. Yes No yes no",
] * 3
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VOCAB = 320  # model rows > len(tokenizer): padded embedding rows, as in real checkpoints

PROMPTS = ["What is 2 + 3?", "Add the numbers.", "What is 2 + 3?"]
TEXTS = ["The answer is 5.\n\nStep two: check.", "Yes", "Step one: add.\n\nStep two.\n\n"]


def make_tokenizer(permute: bool = False, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a tiny corpus; ``permute`` renumbers its regular tokens."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = SPECIAL + (["<s>"] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS, trainer)
    if permute:
        data = json.loads(tk.to_str())
        vocab = data["model"]["vocab"]
        regular = sorted((i for t, i in vocab.items() if t not in specials))
        mapping = dict(zip(regular, reversed(regular)))
        data["model"]["vocab"] = {t: mapping.get(i, i) for t, i in vocab.items()}
        tk = Tokenizer.from_str(json.dumps(data))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<s>" if bos else None
    )
    tok.chat_template = ("{{ bos_token }}" if bos else "") + CHAT
    return tok


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared, loaded machine two threads spin and run ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def responses(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def check_adapter(reward: RewardAdapter, prompts: Sequence[str], resps: Sequence[Sequence[int]], width: int, passes: int = 1) -> None:
    """Batched == per-example; soft score at hard one-hots == score; gradients reach y; the prefix is reusable.

    ``passes``: the adapter's forward passes per response."""
    batch = reward.score(prompts, resps)
    assert batch.passes == passes * len(resps) and batch.values.shape == (len(resps),)
    single = torch.cat([reward.score([p], [r]).values for p, r in zip(prompts, resps)])
    torch.testing.assert_close(batch.values, single, atol=1e-5, rtol=0)
    assert batch.tokens > sum(len(r) for r in resps)
    for b in range(len(resps)):
        for k in (0, len(resps[b]) // 2):
            prefix = reward.prepare(prompts[b], resps[b][:k])
            for _ in range(2):  # the second step reuses the cropped prefix cache
                y = F.one_hot(torch.tensor(resps[b][k:]), width).float().requires_grad_(True)
                soft = reward.score_soft(prefix, y)
                assert soft.passes == passes and soft.tokens >= len(resps[b]) - k
                torch.testing.assert_close(soft.value.detach(), batch.values[b], atol=1e-5, rtol=0)
                soft.value.backward()
                assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
        # a prefix extended token by token (as the decoder does across positions) scores like a fresh one
        prefix = reward.prepare(prompts[b], [])
        for k in range(1, len(resps[b])):
            prefix = reward.extend(prefix, prompts[b], resps[b][:k])
            assert prefix.passes <= passes
        y = F.one_hot(torch.tensor(resps[b][-1:]), width).float()
        torch.testing.assert_close(reward.score_soft(prefix, y).value, batch.values[b], atol=1e-5, rtol=0)


def qwen3_classifier(vocab: int = VOCAB) -> Qwen3ForSequenceClassification:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, num_labels=1, pad_token_id=0, head_dim=8, **TINY)
    return Qwen3ForSequenceClassification(config).eval()


def qwen2_token_classifier() -> Qwen2ForTokenClassification:
    torch.manual_seed(1)
    return Qwen2ForTokenClassification(Qwen2Config(vocab_size=VOCAB, num_labels=2, pad_token_id=0, **TINY)).eval()


def llama_policy() -> LlamaForCausalLM:
    torch.manual_seed(2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, pad_token_id=0, **TINY)).eval()


# --- sequence classifier -------------------------------------------------------------------
def test_classifier_matches_model_output(tok: PreTrainedTokenizerFast) -> None:
    model = qwen3_classifier()
    reward = SequenceClassifierReward(model, tok)
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": TEXTS[0]}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    resp = responses(tok)[0]
    lay = reward.layout(PROMPTS[0], resp)
    assert [i if i >= 0 else resp[s] for i, s in zip(lay.ids, lay.source)] == ids  # the Skywork recipe, token for token
    expected = model(input_ids=torch.tensor([ids])).logits[0][0]
    torch.testing.assert_close(reward.score([PROMPTS[0]], [responses(tok)[0]]).values[0], expected, atol=1e-5, rtol=0)


def test_classifier_adapter_contract(tok: PreTrainedTokenizerFast) -> None:
    check_adapter(SequenceClassifierReward(qwen3_classifier(), tok), PROMPTS, responses(tok), VOCAB)


def test_classifier_through_remapped_policy_vocab(tok: PreTrainedTokenizerFast) -> None:
    policy_tok = make_tokenizer(permute=True)
    reward = SequenceClassifierReward(qwen3_classifier(), tok, policy_tokenizer=policy_tok)
    assert reward.vocab.kind == "remap"
    policy_ids = responses(policy_tok)
    assert policy_ids != responses(tok)
    direct = SequenceClassifierReward(qwen3_classifier(), tok).score(PROMPTS, responses(tok)).values
    torch.testing.assert_close(reward.score(PROMPTS, policy_ids).values, direct, atol=1e-5, rtol=0)
    check_adapter(reward, PROMPTS, policy_ids, VOCAB + 7)


def test_classifier_vocab_check_and_bridge(tok: PreTrainedTokenizerFast) -> None:
    words = sorted({w for t in TEXTS for w in t.split()})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    policy_tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    reward = SequenceClassifierReward(qwen3_classifier(), tok)
    reward.check_vocab(make_tokenizer(permute=True))  # what the engine calls once
    assert reward.vocab.kind == "remap"
    with pytest.raises(VocabMismatchError, match="vocab_bridge=True"):
        reward.check_vocab(policy_tok)
    bridged = SequenceClassifierReward(qwen3_classifier(), tok, policy_tokenizer=policy_tok, vocab_bridge=True)
    assert bridged.vocab.kind == "bridge"
    policy_ids = [policy_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    check_adapter(bridged, PROMPTS, policy_ids, len(policy_tok) + 3)


def test_classifier_bos_appears_once() -> None:
    tok = make_tokenizer(bos=True)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    assert tok.apply_chat_template(messages, tokenize=False).startswith("<s>")
    head, _ = chat_frame(tok, messages, add_special_tokens=True)
    bos = tok.convert_tokens_to_ids("<s>")
    assert head[0] == bos and head.count(bos) == 1
    verbatim, _ = chat_frame(tok, messages, add_special_tokens=False)
    assert verbatim[0] == bos and verbatim.count(bos) == 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=VOCAB, num_labels=1, pad_token_id=0, **TINY)).eval()
    check_adapter(SequenceClassifierReward(model, tok), PROMPTS[:2], responses(tok)[:2], VOCAB)


def test_classifier_from_pretrained(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = qwen3_classifier()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = SequenceClassifierReward.from_pretrained(str(tmp_path), dtype=torch.float32, policy_tokenizer=tok)
    assert loaded.vocab.kind == "identity"
    expected = SequenceClassifierReward(model, tok).score(PROMPTS, responses(tok)).values
    torch.testing.assert_close(loaded.score(PROMPTS, responses(tok)).values, expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training


def test_classifier_needs_one_label(tok: PreTrainedTokenizerFast) -> None:
    model = Qwen3ForSequenceClassification(Qwen3Config(vocab_size=VOCAB, num_labels=2, pad_token_id=0, **TINY))
    with pytest.raises(ValueError, match="one label"):
        SequenceClassifierReward(model, tok)


# --- process reward ------------------------------------------------------------------------
def test_aggregation_by_hand() -> None:
    s = torch.tensor([0.2, 0.9, 0.5])
    assert math.isclose(float(aggregate(s, "sum")), 1.6, abs_tol=1e-6)
    assert math.isclose(float(aggregate(s, "min")), 0.2, abs_tol=1e-6)
    assert math.isclose(float(aggregate(s, "last")), 0.5, abs_tol=1e-6)
    assert math.isclose(float(aggregate(s, "mean")), 1.6 / 3, abs_tol=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(s, "max")  # type: ignore[arg-type]


def test_process_steps_and_tags(tok: PreTrainedTokenizerFast) -> None:
    reward = ProcessReward(qwen2_token_classifier(), tok)
    ids = tok("A.\n\nB.", add_special_tokens=False)["input_ids"]
    ends = reward.step_ends(ids)
    assert sum(ends) == 1 and tok.decode(ids[: ends.index(True) + 1]) == "A.\n\n"
    lay = reward.layout("q", ids)
    tag = tok.convert_tokens_to_ids("<extra_0>")
    assert [lay.ids[r] for r in lay.reads] == [tag, tag]
    head, tail = reward.frame("q")
    cut = ends.index(True) + 1
    assert lay.ids == head + [-1] * cut + [tag] + [-1] * (len(ids) - cut) + [tag] + tail
    ending = tok("A.\n\nB.\n\n", add_special_tokens=False)["input_ids"]
    assert reward.layout("q", ending).ids.count(tag) == 2  # no extra tag after a final separator


@pytest.mark.parametrize("how", ["sum", "min", "last", "mean"])
def test_process_score_by_hand(tok: PreTrainedTokenizerFast, how: str) -> None:
    model = qwen2_token_classifier()
    reward = ProcessReward(model, tok, aggregation=how)  # type: ignore[arg-type]
    resp = responses(tok)[2]  # two separators: three tags (the last after the final separator only)
    lay = reward.layout(PROMPTS[2], resp)
    ids = [i if i >= 0 else resp[s] for i, s in zip(lay.ids, lay.source)]
    probs = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
    tag = tok.convert_tokens_to_ids("<extra_0>")
    steps = probs[[i for i, t in enumerate(ids) if t == tag]]
    assert len(steps) == 2
    expected = {"sum": steps.sum(), "min": steps.min(), "last": steps[-1], "mean": steps.mean()}[how]
    torch.testing.assert_close(reward.score([PROMPTS[2]], [resp]).values[0], expected, atol=1e-5, rtol=0)


def test_process_adapter_contract(tok: PreTrainedTokenizerFast) -> None:
    reward = ProcessReward(qwen2_token_classifier(), tok, system="Please reason step by step.")
    assert reward.kind == "process"
    check_adapter(reward, PROMPTS, responses(tok), VOCAB)


def test_process_from_pretrained(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = qwen2_token_classifier()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = ProcessReward.from_pretrained(str(tmp_path), dtype=torch.float32, policy_tokenizer=tok)
    expected = ProcessReward(model, tok).score(PROMPTS, responses(tok)).values
    torch.testing.assert_close(loaded.score(PROMPTS, responses(tok)).values, expected, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        ProcessReward.from_pretrained(str(tmp_path), policy_tokenizer=tok)


def test_process_tag_must_be_one_token(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="one"):
        ProcessReward(qwen2_token_classifier(), tok, step_tag="<step>")


# --- self-judging ---------------------------------------------------------------------------
def test_self_judge(tok: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, pad_token_id=0, **TINY)).eval()
    reward = SelfJudgeReward(model, tok)
    messages = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": TEXTS[0]},
        {"role": "user", "content": "Is this answer correct? Answer Yes or No."},
    ]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]
    logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    expected = logp[yes] - logp[no]
    torch.testing.assert_close(reward.score([PROMPTS[0]], [responses(tok)[0]]).values[0], expected, atol=1e-5, rtol=0)
    check_adapter(reward, PROMPTS, responses(tok), VOCAB)
    reward.check_vocab(tok)
    with pytest.raises(ValueError, match="exact vocabulary"):
        reward.check_vocab(make_tokenizer(permute=True))


# --- verifier -------------------------------------------------------------------------------
def test_verifier(tok: PreTrainedTokenizerFast) -> None:
    reward = VerifierReward(lambda prompt, text: float("5" in text) + len(prompt) * 0.0, tok)
    scores = reward.score(PROMPTS, responses(tok))
    assert scores.values.tolist() == [1.0, 0.0, 0.0] and scores.passes == 0
    assert not reward.differentiable
    with pytest.raises(NoGradientError):
        reward.prepare(PROMPTS[0], [])
    with pytest.raises(NoGradientError):
        reward.score_soft(None, torch.zeros(1, VOCAB))  # type: ignore[arg-type]


# --- LoRA reward on the policy's backbone --------------------------------------------------------
def _randomize_adapter(reward: LoRAReward) -> None:
    torch.manual_seed(4)
    with torch.no_grad():
        for p in reward.adapter_parameters():
            p.normal_(0, 0.5)


def test_lora_shares_backbone_and_leaves_policy_unchanged(tok: PreTrainedTokenizerFast) -> None:
    policy = llama_policy()
    before = {n: p.data_ptr() for n, p in policy.named_parameters()}
    ids = torch.tensor([responses(tok)[0]])
    reference = policy(input_ids=ids).logits
    reward = LoRAReward(policy, tok, rank=4)
    _randomize_adapter(reward)
    after = {n.replace(".base_layer", ""): p.data_ptr() for n, p in policy.named_parameters() if ".nabla_reward." not in n}
    assert after == before
    assert policy.get_input_embeddings().weight.data_ptr() == reward.embedding.data_ptr()
    torch.testing.assert_close(policy(input_ids=ids).logits, reference, atol=0, rtol=0)
    with reward.adapter():
        assert not torch.allclose(policy(input_ids=ids).logits, reference)
    # the engine's call: soft inputs and a KV cache, adapter off
    embeds = F.one_hot(ids, VOCAB).float() @ policy.get_input_embeddings().weight
    out = policy(inputs_embeds=embeds, cache=DynamicCache(config=policy.config), use_cache=True)
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in policy.parameters())
    check_adapter(reward, PROMPTS, responses(tok), VOCAB)
    torch.testing.assert_close(policy(input_ids=ids).logits, reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already"):
        LoRAReward(policy, tok)


def test_lora_save_load(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    reward = LoRAReward(llama_policy(), tok, rank=4, target_modules=("q_proj", "v_proj", "o_proj"))
    _randomize_adapter(reward)
    path = reward.save(tmp_path / "reward.safetensors")
    assert path.stat().st_size < 200_000
    loaded = LoRAReward.load(path, llama_policy(), tok)
    assert loaded.rank == 4 and loaded.target_modules == ("q_proj", "v_proj", "o_proj")
    torch.testing.assert_close(loaded.score(PROMPTS, responses(tok)).values, reward.score(PROMPTS, responses(tok)).values)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **{**TINY, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="does not fit"):
        LoRAReward.load(path, other, tok)


def test_lora_files_name_the_reward_by_path_and_content(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    # two LoRA files on the same policy must not share a cache key (they used to: both were "LoRAReward")
    from nabla_lc import Engine
    from nabla_lc.langchain import NablaReasonerLLM
    from nabla_lc.rewards.load import load_reward

    reward = LoRAReward(llama_policy(), tok, rank=2)
    first = reward.save(tmp_path / "a.safetensors")
    _randomize_adapter(reward)
    second = reward.save(tmp_path / "b.safetensors")
    same_content = tmp_path / "c.safetensors"
    same_content.write_bytes(first.read_bytes())
    names = [LoRAReward.load(p, llama_policy(), tok).identity for p in (first, second, same_content)]
    assert len(set(names)) == 3 and all("@sha256:" in n for n in names)
    assert names[0].split("@")[1] == names[2].split("@")[1] and str(first.resolve()) in names[0]
    keys = [
        NablaReasonerLLM(engine=Engine(policy, tok, load_reward(str(p), policy, tok)))._identifying_params["reward"]
        for p, policy in ((first, llama_policy()), (second, llama_policy()))
    ]
    assert keys == names[:2]
    assert load_reward("judge", llama_policy(), tok).identity == "judge"  # type: ignore[union-attr]


# --- training ---------------------------------------------------------------------------------
def write_records(path: Path) -> list[train_mod.Record]:
    rows = []
    for a in range(6):
        prompt = f"What is {a} + 3?"
        rows.append({"prompt": prompt, "response": f"The answer is {a + 3}.", "correct": True})
        rows.append({"prompt": prompt, "response": "No", "correct": False})
        rows.append({"prompt": prompt, "response": "Yes no", "correct": False})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return train_mod.read_records(path)


@pytest.mark.parametrize("objective, head", [("bt", "scalar"), ("bce", "scalar"), ("bt", "implicit")])
def test_train_reward_api(tok: PreTrainedTokenizerFast, tmp_path: Path, objective: str, head: str) -> None:
    records = write_records(tmp_path / "data.jsonl")
    policy = llama_policy()
    reference = policy(input_ids=torch.tensor([responses(tok)[0]])).logits
    reward, report = train_mod.train_reward(
        policy, tok, records, rank=4, objective=objective, epochs=3, lr=3e-3, batch_size=4, progress=False, head=head  # type: ignore[arg-type]
    )
    assert type(reward) is {"scalar": LoRAReward, "implicit": ImplicitLoRAReward}[head]
    assert report.steps > 0 and math.isfinite(report.final_loss)
    assert report.heldout_pairs > 0 and report.heldout_accuracy is not None
    assert report.train_records + report.heldout_records == len(records)
    assert not any(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reward.trainable_parameters())
    torch.testing.assert_close(policy(input_ids=torch.tensor([responses(tok)[0]])).logits, reference, atol=0, rtol=0)
    if objective == "bt":
        accuracy, _ = train_mod.heldout_accuracy(reward, tok, records)
        assert accuracy is not None and accuracy > 0.9  # the tiny model separates these easily


def test_read_records_rejects_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        train_mod.read_records(tmp_path / "bad.jsonl")


def test_train_reward_cli(tok: PreTrainedTokenizerFast, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "nabla_lc.cli.train" in cli.COMMANDS
    write_records(tmp_path / "data.jsonl")
    llama_policy().save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    parser = argparse.ArgumentParser()
    cli_train.add_parsers(parser.add_subparsers())
    out = tmp_path / "reward.safetensors"
    args = parser.parse_args(
        ["train-reward", "--data", str(tmp_path / "data.jsonl"), "--policy", str(tmp_path / "policy"),
         "--out", str(out), "--rank", "2", "--target-modules", "q_proj,k_proj", "--objective", "bt",
         "--epochs", "1", "--lr", "1e-3", "--batch-size", "8", "--seed", "1", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["heldout_pairs"] > 0
    loaded = LoRAReward.load(out, llama_policy(), tok)
    assert loaded.rank == 2 and loaded.target_modules == ("q_proj", "k_proj")
    args = parser.parse_args(
        ["train-reward", "--data", str(tmp_path / "data.jsonl"), "--policy", str(tmp_path / "policy"), "--out", str(out),
         "--rank", "2", "--head", "implicit", "--max-steps", "1", "--batch-size", "2", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    assert type(LoRAReward.load(out, llama_policy(), tok)) is ImplicitLoRAReward


def _lora_file(path: Path, settings: object, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    from nabla_lc.rewards.lora import FORMAT

    tensors = tensors if tensors is not None else {"lora.model.layers.0.self_attn.q_proj.lora_A.nabla_reward.weight": torch.zeros(2, 2)}
    save_file(tensors, str(path), metadata={"format": FORMAT, "settings": settings if isinstance(settings, str) else json.dumps(settings)})
    return path


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rank": 100_000_000, "target_modules": ["q_proj"]}, "settings say rank 100000000, its LoRA tensors have rank"),
        ({"rank": 2.5, "target_modules": ["q_proj"]}, "rank must be an integer >= 1"),
        ({"rank": 2, "target_modules": "q_proj"}, "target_modules must be a list"),
        ({"rank": 2, "alpha": "inf", "target_modules": ["q_proj"]}, "alpha must be a finite number"),
        ({"rank": 2, "target_modules": ["q_proj"], "dropout": 0.5}, "unexpected settings"),
        ("{not json", "settings are not JSON"),
    ],
)
def test_lora_file_metadata_is_checked_against_its_tensors_before_any_allocation(
    tok: PreTrainedTokenizerFast, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: object, message: str
) -> None:
    from nabla_lc.rewards import lora

    path = _lora_file(tmp_path / "reward.safetensors", settings)
    assert path.stat().st_size < 400  # a file this small once made the loader allocate 12.8 GB
    monkeypatch.setattr(lora, "inject_adapter_in_model", lambda *a, **k: pytest.fail("the adapter was allocated"))
    with pytest.raises(ValueError, match=rf"{path} is not a valid nabla-lc LoRA reward file: .*{message}"):
        LoRAReward.load(path, llama_policy(), tok)


def _saved_then_edited(tok: PreTrainedTokenizerFast, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None]) -> Path:
    """A LoRA reward file saved by the project, then rewritten with ``edit`` applied to its tensors and metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = LoRAReward(llama_policy(), tok, rank=2).save(tmp_path / "reward.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118 (why: safe_open cannot be iterated)
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _head_one_by_one(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors["head.weight"] = torch.ones(1, 1)  # copy_ would broadcast it over the model's (1, 32)


def _nan_adapter(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    name = next(k for k in tensors if ".lora_A." in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def _huge_alpha(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    metadata["settings"] = json.dumps({**json.loads(metadata["settings"]), "alpha": 1e308})


@pytest.mark.parametrize(
    ("edit", "message"),
    [(_head_one_by_one, r"head\.weight is \(1, 1\), the model's is \(1, 32\)"), (_nan_adapter, "not finite"), (_huge_alpha, r"alpha must be in \[0, 1000")],
)
def test_lora_file_tensors_are_checked_for_shape_and_finiteness(
    tok: PreTrainedTokenizerFast, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None], message: str
) -> None:
    path = _saved_then_edited(tok, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        LoRAReward.load(path, llama_policy(), tok)


def test_a_garbage_reward_file_is_one_line_and_exit_2(tok: PreTrainedTokenizerFast, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nabla_lc.cli import main

    policy = tmp_path / "policy"
    llama_policy().save_pretrained(policy)
    tok.save_pretrained(policy)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        LoRAReward.load(garbage, llama_policy(), tok)
    capsys.readouterr()
    assert main(["solve", "2+2?", "--policy", str(policy), "--reward", str(garbage), "--method", "greedy"]) == 2
    err = capsys.readouterr().err.strip()  # after transformers' loading bar: the one line, no traceback
    assert "Traceback" not in err and err.splitlines()[-1].startswith("nabla-lc: error: ") and "is not a safetensors file" in err


# --- implicit (log-probability ratio) LoRA reward ------------------------------------------------
def test_implicit_reward_is_the_adapter_log_ratio(tok: PreTrainedTokenizerFast) -> None:
    policy = llama_policy()
    reward = ImplicitLoRAReward(policy, tok, rank=4)
    assert reward.score(PROMPTS, responses(tok)).values.abs().max() == 0  # a fresh adapter (B = 0) is the policy
    _randomize_adapter(reward)
    resp = responses(tok)[0]
    lay = reward.layout(PROMPTS[0], resp)
    ids = torch.tensor([[i if i >= 0 else resp[s] for i, s in zip(lay.ids, lay.source)]])
    first = reward.first_scored(PROMPTS[0])
    with reward.adapter():
        on = policy(input_ids=ids).logits.log_softmax(-1)
    off = policy(input_ids=ids).logits.log_softmax(-1)
    targets = ids[0, first:]
    expected = (on[0, first - 1 : -1] - off[0, first - 1 : -1]).gather(-1, targets[:, None]).sum()
    torch.testing.assert_close(reward.score([PROMPTS[0]], [resp]).values[0], expected, atol=1e-4, rtol=0)
    check_adapter(reward, PROMPTS, responses(tok), VOCAB, passes=2)


def test_implicit_reward_gradient_matches_finite_differences(tok: PreTrainedTokenizerFast) -> None:
    reward = ImplicitLoRAReward(llama_policy(), tok, rank=4)
    _randomize_adapter(reward)
    resp = max(responses(tok), key=len)
    prefix = reward.prepare(PROMPTS[1], resp[:2])
    torch.manual_seed(5)
    y = F.softmax(torch.randn(len(resp) - 2, VOCAB), -1).requires_grad_(True)
    reward.score_soft(prefix, y).value.backward()
    direction = torch.randn_like(y) * 1e-3  # small: a randomized adapter makes the reward sharply curved
    with torch.no_grad():
        up = reward.score_soft(prefix, y + direction).value
        down = reward.score_soft(prefix, y - direction).value
    torch.testing.assert_close((up - down) / 2, (y.grad * direction).sum(), rtol=0.05, atol=1e-4)


def test_implicit_reward_save_load(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    reward = ImplicitLoRAReward(llama_policy(), tok, rank=4)
    _randomize_adapter(reward)
    assert reward.head is None and len(reward.trainable_parameters()) == len(reward.adapter_parameters())
    path = reward.save(tmp_path / "implicit.safetensors")
    loaded = LoRAReward.load(path, llama_policy(), tok)
    assert type(loaded) is ImplicitLoRAReward
    torch.testing.assert_close(loaded.score(PROMPTS, responses(tok)).values, reward.score(PROMPTS, responses(tok)).values)
    scalar = LoRAReward.load(LoRAReward(llama_policy(), tok, rank=4).save(tmp_path / "scalar.safetensors"), llama_policy(), tok)
    assert type(scalar) is LoRAReward and scalar.head is not None
    bogus = _lora_file(tmp_path / "bogus.safetensors", {"rank": 4, "target_modules": ["q_proj", "v_proj"], "head": "mlp"}, load_file(str(path)))
    with pytest.raises(ValueError, match="head must be one of"):
        LoRAReward.load(bogus, llama_policy(), tok)
