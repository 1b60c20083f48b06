"""The LoRA process reward on the policy's backbone: step reads, native partial scores, gradients, files, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nabla_lc.rewards import LoRAReward
from nabla_lc.rewards import train as train_mod

from .test_rewards import PROMPTS, TEXTS, _randomize_adapter, check_adapter, llama_policy, one_thread, responses, tok  # noqa: F401

SEP = "\n\n"


def _process(tok, aggregation="last") -> LoRAReward:  # noqa: F811
    reward = LoRAReward(llama_policy(), tok, rank=4, step_separator=SEP, aggregation=aggregation)
    _randomize_adapter(reward)
    torch.manual_seed(5)
    with torch.no_grad():
        reward.head.weight.normal_(0, 1.0)
    return reward


def test_reads_at_step_ends_and_the_last_token(tok) -> None:  # noqa: F811
    reward = _process(tok)
    assert reward.kind == "process"
    for text, resp in zip(TEXTS, responses(tok)):
        _, _, reads = reward.response_slots(resp, final=True)
        cuts = [tok.decode(resp[: j + 1]) for j in reads]
        assert all(c.endswith(SEP) or c == tok.decode(resp) for c in cuts)
        assert len(reads) == text.count(SEP) + (not text.endswith(SEP))
    assert reward.response_slots([], final=True)[2] == [] and len(reward.layout(PROMPTS[0], []).reads) == 1


@pytest.mark.parametrize("aggregation", ["last", "min", "sum"])
def test_adapter_contract_and_aggregation(tok, aggregation) -> None:  # noqa: F811
    reward = _process(tok, aggregation)
    if aggregation != "min":  # why: a minimum in the committed part has, rightly, no gradient in the new tokens
        check_adapter(reward, PROMPTS, responses(tok), 320)
    with torch.no_grad(), reward.adapter():
        reads = reward.reads(PROMPTS, responses(tok))
    expected = torch.stack([{"last": r[-1], "min": r.min(), "sum": r.sum()}[aggregation] for r in reads])
    torch.testing.assert_close(reward.score(PROMPTS, responses(tok)).values, expected, atol=1e-5, rtol=0)


def test_a_partial_response_is_scored_natively(tok) -> None:  # noqa: F811
    # the score of the response up to a step end is the full response's read at that step (a causal model's reads
    # do not see what follows them), so step-level search scores partial responses exactly as the full one would
    reward = _process(tok)
    full = responses(tok)[0]
    _, _, reads = reward.response_slots(full, final=True)
    prefix = full[: reads[0] + 1]
    with torch.no_grad(), reward.adapter():
        step_scores = reward.reads([PROMPTS[0]], [full])[0]
    partial = reward.score_partial([PROMPTS[0]], [prefix]).values[0]
    torch.testing.assert_close(partial, step_scores[0], atol=1e-5, rtol=0)


def test_process_settings_survive_save_and_load(tok, tmp_path: Path) -> None:  # noqa: F811
    reward = _process(tok, "min")
    path = reward.save(tmp_path / "process.safetensors")
    loaded = LoRAReward.load(path, llama_policy(), tok)
    assert (loaded.kind, loaded.step_separator, loaded.aggregation) == ("process", SEP, "min")
    torch.testing.assert_close(loaded.score(PROMPTS, responses(tok)).values, reward.score(PROMPTS, responses(tok)).values)
    outcome = LoRAReward.load(LoRAReward(llama_policy(), tok, rank=2).save(tmp_path / "outcome.safetensors"), llama_policy(), tok)
    assert outcome.kind == "outcome" and outcome.step_separator is None
    with pytest.raises(ValueError, match="step_separator is empty"):
        LoRAReward(llama_policy(), tok, step_separator="")


def test_train_process_reward_learns_the_steps_of_correct_answers(tok, tmp_path: Path) -> None:  # noqa: F811
    rows = []
    for a in range(8):
        prompt = f"What is {a} + 3?"
        rows.append({"prompt": prompt, "response": "Step one: add.\n\nThe answer is 5.", "correct": True})
        rows.append({"prompt": prompt, "response": "Yes no\n\nNo", "correct": False})
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = train_mod.read_records(tmp_path / "r.jsonl")
    policy = llama_policy()
    reward, report = train_mod.train_process_reward(policy, tok, records, rank=4, epochs=12, lr=3e-3, batch_size=4, progress=False)
    assert report.steps == 12 * math.ceil(report.train_records / 4) and math.isfinite(report.final_loss)
    assert report.heldout_steps == 2 * report.heldout_records  # two steps per response
    assert report.step_positive_fraction == 0.5 and report.step_accuracy == 1.0 and report.heldout_accuracy == 1.0
    assert not any(p.requires_grad for p in policy.parameters())
    bon, mean, questions = train_mod.best_of_n(reward, tok, records)
    assert (bon, mean, questions) == (1.0, 0.5, 8)


def test_the_command_trains_from_saved_records(tmp_path: Path, monkeypatch, capsys) -> None:
    from nabla_lc import cli, models

    from .tiny import make_policy, make_tokenizer

    tiny = make_tokenizer()
    monkeypatch.setattr(models, "load_embedded", lambda: (make_policy(tiny), tiny))
    saved = tmp_path / "saved.jsonl"
    saved.write_text("".join(
        json.dumps({"prompt": f"What is {a} + 1?", "response": f"add\n\n{a + 1 + wrong}", "correct": not wrong}) + "\n"
        for a in range(5) for wrong in (0, 1)
    ))  # fmt: skip
    out = tmp_path / "p.safetensors"
    assert cli.main(["train-process-reward", "--records", str(saved), "--rank", "2", "--max-steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 10 and summary["steps"] == 2 and summary["heldout_steps"] == 4 and summary["heldout_questions"] == 1
    assert summary["heldout_mean_accuracy"] == 0.5 and summary["step_positive_fraction"] == 0.5
    assert LoRAReward.load(out, make_policy(tiny), tiny).step_separator == SEP
