"""The default reward's recipe (training questions, labeled samples, the CLI) on tiny models, and the shipped file.

The ``real_model`` test loads the embedded SmolLM2-135M-Instruct and the reward file shipped in the package, and
checks that the reward rides on the policy's own weights and ranks a right answer above a wrong one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from nabla_lc import NablaConfig, cli
from nabla_lc.bench import arith
from nabla_lc.bench.reward_recipe import RESERVED_DEV, TRAIN_LEVELS, generate_records, training_problems
from nabla_lc.bench.runner import ARITH_DEFAULT_COUNT
from nabla_lc.cli import flags, solve, train
from nabla_lc.rewards import LoRAReward
from nabla_lc.rewards.default import DEFAULT_REWARD_FILE, RECIPE_COMMAND, load_default_reward

from .tiny import make_policy, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_training_questions_avoid_the_reserved_dev_questions() -> None:
    problems = training_problems(100)
    questions = [p.problem for p in problems]
    assert len(set(questions)) == 100
    assert all(p.id.startswith(f"arith-dev-l{TRAIN_LEVELS[0]}-") for p in problems)
    reserved = {p.problem for p in arith.make_problems("dev", RESERVED_DEV, level=TRAIN_LEVELS[0])}
    assert not reserved & set(questions)
    assert training_problems(100) == problems  # seeded
    assert RESERVED_DEV >= ARITH_DEFAULT_COUNT  # the bench's default dev questions stay out of training


def test_training_questions_refuse_more_than_a_level_holds() -> None:
    with pytest.raises(ValueError, match="unreserved dev questions"):
        training_problems(200, levels=(1,))


def test_generate_records_labels_each_sample_by_its_answer(tok) -> None:
    policy = make_policy(tok)
    question = "What is 7 + 5?"
    first = generate_records(policy, tok, [arith.Problem(question, "12", 2, "q")], samples=8, max_new_tokens=12, seed=3, progress=False)
    assert len(first) == 8 and all(r["prompt"] == question for r in first)
    answers = [arith.extract_answer(r["response"]) for r in first]
    target = next((a for a in answers if a is not None), None)
    assert target is not None, "the tiny policy wrote no number in 8 samples; pick another seed"
    # The same seed decodes the same samples; with the reference set to one of their answers, exactly
    # the samples holding that answer are correct.
    again = generate_records(policy, tok, [arith.Problem(question, target, 2, "q")], samples=8, max_new_tokens=12, seed=3, progress=False)
    assert [r["response"] for r in again] == [r["response"] for r in first]
    assert [r["correct"] for r in again] == [a == target for a in answers]


def test_generate_records_splits_samples_over_system_messages(tok) -> None:
    policy = make_policy(tok)
    problems = [arith.Problem("What is 2 + 2?", "4", 2, "a"), arith.Problem("What is 3 + 4?", "7", 2, "b")]
    rows = generate_records(policy, tok, problems, samples=4, max_new_tokens=6, systems=("Be brief.", None), batch_size=1, progress=False)
    assert [r["prompt"] for r in rows] == [problems[0].problem] * 4 + [problems[1].problem] * 4
    with pytest.raises(ValueError, match="multiple"):
        generate_records(policy, tok, problems, samples=3, systems=("Be brief.", None), progress=False)


def test_load_default_reward_names_the_recipe_when_the_file_is_missing(tok, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=RECIPE_COMMAND):
        load_default_reward(make_policy(tok), tok, tmp_path / "absent.safetensors")


def test_load_default_reward_rides_on_the_policy(tok, tmp_path: Path) -> None:
    trained = LoRAReward(make_policy(tok), tok, rank=2)
    with torch.no_grad():
        trained.head.weight.normal_()
        for p in trained.adapter_parameters():
            p.normal_(0, 0.5)
    path = trained.save(tmp_path / "reward.safetensors")
    policy = make_policy(tok)
    reward = load_default_reward(policy, tok, path)
    assert reward.model is policy
    assert reward.embedding.data_ptr() == policy.get_input_embeddings().weight.data_ptr()
    prompts, responses = ["What is 1 + 1?"] * 2, [tok("2")["input_ids"], tok("3")["input_ids"]]
    torch.testing.assert_close(reward.score(prompts, responses).values, trained.score(prompts, responses).values)


def test_the_command_is_registered_and_writes_the_packaged_file_by_default() -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    assert "nabla_lc.cli.train" in cli.COMMANDS
    train.add_parsers(subparsers)
    args = parser.parse_args(["train-default-reward", "--rank", "16", "--target-modules", "q_proj,k_proj"])
    assert args.out == DEFAULT_REWARD_FILE and args.rank == 16 and args.records is None
    assert DEFAULT_REWARD_FILE.parent.name == "data" and DEFAULT_REWARD_FILE.parent.parent.name == "nabla_lc"


def test_the_command_trains_from_saved_records_and_writes_them_first(tok, tmp_path: Path, monkeypatch, capsys) -> None:
    from nabla_lc import models

    monkeypatch.setattr(models, "load_embedded", lambda: (make_policy(tok), tok))
    fresh = tmp_path / "fresh.jsonl"
    base = ["train-default-reward", "--rank", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "r.safetensors")]
    assert cli.main([*base, "--questions", "2", "--samples", "2", "--records", str(fresh)]) == 2
    assert capsys.readouterr().err.endswith("nabla-lc: error: no training pairs (records: 4)\n")  # the random policy answers nothing right
    written = [json.loads(line) for line in fresh.read_text().splitlines()]
    assert [r["prompt"] for r in written] == [p.problem for p in training_problems(2) for _ in range(2)]

    saved = tmp_path / "saved.jsonl"
    saved.write_text("".join(
        json.dumps({"prompt": f"What is {a} + 1?", "response": f"{a + 1 + wrong}", "correct": not wrong}) + "\n"
        for a in range(5) for wrong in (0, 1)
    ))
    assert cli.main([*base, "--records", str(saved)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 10 and summary["generate_s"] is None and summary["heldout_pairs"] == 1
    assert load_default_reward(make_policy(tok), tok, tmp_path / "r.safetensors").rank == 2


@pytest.mark.real_model
def test_real_shipped_reward_shares_the_policy_and_ranks_right_above_wrong() -> None:
    from nabla_lc.models import load_embedded

    model, tokenizer = load_embedded(device="cpu")
    ids = tokenizer("What is 7 + 8?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    reward = load_default_reward(model, tokenizer)
    assert reward.model is model
    assert reward.embedding.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # the adapter is off for the policy
    right, wrong = (f"7 + 8 = {n}. The answer is {n}." for n in (15, 13))
    values = reward.score(["What is 7 + 8?"] * 2, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (right, wrong)]).values
    assert values[0] > values[1]


def test_the_cli_starts_the_default_reward_from_its_config_and_flags_override_it() -> None:
    parser = argparse.ArgumentParser()
    solve.add_parsers(parser.add_subparsers(dest="command"))
    embedded = flags.config_from_args(parser.parse_args(["solve", "q"]))
    assert (embedded.grad_threshold, embedded.dto_positions, embedded.max_new_tokens) == (0.01, "first", 96)
    assert (embedded.step, embedded.target_kl) == ("trust_region", 0.5)
    assert embedded.replace(grad_threshold=8.0, dto_positions="all", max_new_tokens=256, step="adam") == NablaConfig()
    paper = flags.config_from_args(parser.parse_args(["solve", "q", "--dto-positions", "all", "--max-new-tokens", "256"]))
    assert (paper.dto_positions, paper.max_new_tokens) == ("all", 256)
    other = flags.config_from_args(parser.parse_args(["solve", "q", "--reward", "judge"]))
    assert other == NablaConfig()
