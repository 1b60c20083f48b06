"""The benchmark runner with a scripted engine: resumption, sharding plus merge, the summary and the CLI."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from nabla_lc.bench.grading import Verdict, extract_answer
from nabla_lc.bench.report import paired_counts, sign_test, summarize, to_markdown, write_report
from nabla_lc.bench.runner import (
    BenchProblem,
    Task,
    jobs,
    load_task,
    merge_results,
    parse_shard,
    read_results,
    results_path,
    run_bench,
)
from nabla_lc.cli import bench as bench_cli
from nabla_lc.config import ConfigError, NablaConfig
from nabla_lc.engine.accounting import Stats
from nabla_lc.engine.types import Result

METHODS = ["greedy", "bon", "nabla"]
NS = [1, 4]


@dataclass(frozen=True)
class FakeRequest:
    prompt: str
    system: str | None
    seed: int | None


class ScriptedEngine:
    """Answers ``problem k`` with k when (seed + n) is even, else k + 1; counts grow with N. Records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int | None]]] = []

    def request(self, prompt: str, *, chat: bool = True, system: str | None = None, seed: int | None = None) -> FakeRequest:
        assert chat
        return FakeRequest(prompt, system, seed)

    def generate(self, requests, config=None, *, extract_answer=None):
        self.calls.append((config.method, config.n, [r.seed for r in requests]))
        results = []
        for r in requests:
            k = int(r.prompt.split()[-1])
            answer = k if (r.seed + config.n) % 2 == 0 else k + 1
            text = f"Reasoning about {k}. So \\boxed{{{answer}}}"
            stats = Stats(policy_forward=10 * config.n + k, reward_forward=config.n, rollout_tokens=5 * config.n,
                          proposals=k % 3, rejections=k % 2, positions=10, skipped_entropy=k % 4, skipped_gradient=1, wall_s=0.5 / len(requests))
            results.append(Result(text, [1, 2], "stop", stats, reward=float(k), answer=extract_answer(text)))
        return results


def exact_grade(answer: str | None, final_answer: str) -> Verdict:
    same = answer == final_answer
    return Verdict(same, same, same)


def make_task(count: int = 7) -> Task:
    problems = [BenchProblem(f"p{k}", f"problem {k}", str(k)) for k in range(count)]
    return Task("toy", problems, extract_answer, exact_grade, info={"data": "toy"})


def strip_batch(rows: list[dict]) -> list[dict]:
    """Rows without what batching changes: the batch size and the (shared) wall time."""
    return [{**{k: v for k, v in r.items() if k != "batch"}, "stats": {**r["stats"], "wall_s": None}} for r in rows]


def test_jobs_run_greedy_once() -> None:
    assert jobs(["greedy", "bon", "nabla"], [1, 4]) == [("greedy", 1), ("bon", 1), ("bon", 4), ("nabla", 1), ("nabla", 4)]
    with pytest.raises(ValueError, match="unknown method"):
        jobs(["mcts"], [1])
    with pytest.raises(ValueError, match=">= 1"):
        jobs(["bon"], [0])


def test_run_writes_one_graded_row_per_item(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    rows = run_bench(engine, make_task(), METHODS, NS, NablaConfig(seed=10), tmp_path, batch_size=3)
    assert len(rows) == 7 * 5 and read_results(results_path(tmp_path)) == rows
    row = next(r for r in rows if r["id"] == "p3" and r["method"] == "bon" and r["n"] == 4)
    assert row["seed"] == 13 and row["answer"] == "4" and row["correct"] is False  # (13 + 4) is odd: k + 1
    assert row["stats"]["model_calls"] == 10 * 4 + 3 + 4 and row["reward"] == 3.0 and not row["disagree"]
    assert row["text"].endswith("\\boxed{4}")
    assert {len(seeds) for _, _, seeds in engine.calls} == {3, 1}  # batches of 3, 3, 1 per (method, N)


def test_rerun_resumes_without_engine_calls(tmp_path: Path) -> None:
    first = run_bench(ScriptedEngine(), make_task(), METHODS, NS, NablaConfig(), tmp_path, batch_size=2)
    again = ScriptedEngine()
    assert run_bench(again, make_task(), METHODS, NS, NablaConfig(), tmp_path, batch_size=2) == first
    assert again.calls == []


def test_interrupted_run_resumes_only_missing_items(tmp_path: Path) -> None:
    full = run_bench(ScriptedEngine(), make_task(), METHODS, NS, NablaConfig(), tmp_path / "full")
    path = results_path(tmp_path / "part")
    path.parent.mkdir()
    lines = (tmp_path / "full" / "results.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:9]) + lines[9][:40])  # a crash in the middle of the tenth line
    engine = ScriptedEngine()
    rows = run_bench(engine, make_task(), METHODS, NS, NablaConfig(), tmp_path / "part")
    assert sum(len(seeds) for _, _, seeds in engine.calls) == len(full) - 9
    assert strip_batch(rows) == strip_batch(full) and read_results(path) == rows


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)
    with pytest.raises(ValueError, match="config.temperature"):
        run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(temperature=0.7), tmp_path)


def test_a_run_stored_before_a_field_existed_resumes_at_its_default_only(tmp_path: Path) -> None:
    run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)
    info = json.loads((tmp_path / "run.json").read_text())
    del info["config"]["coupled_rollouts"]  # as written by a version without the field
    (tmp_path / "run.json").write_text(json.dumps(info))
    again = ScriptedEngine()
    run_bench(again, make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)
    assert again.calls == []
    with pytest.raises(ValueError, match="config.coupled_rollouts"):
        run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(coupled_rollouts=True), tmp_path)


def test_shards_merge_to_the_unsharded_run(tmp_path: Path) -> None:
    whole = run_bench(ScriptedEngine(), make_task(), METHODS, NS, NablaConfig(), tmp_path / "whole", batch_size=4)
    for i in range(3):
        engine = ScriptedEngine()
        rows = run_bench(engine, make_task(), METHODS, NS, NablaConfig(), tmp_path / "sharded", batch_size=2, shard=(i, 3))
        assert {r["index"] % 3 for r in rows} == {i}
        assert (tmp_path / "sharded" / f"results.shard-{i}-of-3.jsonl").exists()
    merged = merge_results(tmp_path / "sharded")
    assert strip_batch(merged) == strip_batch(whole)
    assert strip_batch(read_results(tmp_path / "sharded" / "results.jsonl")) == strip_batch(whole)
    assert merge_results(tmp_path / "sharded") == merged  # merging again changes nothing


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def stats(**kw: float) -> dict:
    s = Stats(**{k: v for k, v in kw.items() if k not in ("model_calls", "model_calls_paper")}).to_dict()
    s.update({k: kw[k] for k in ("model_calls", "model_calls_paper") if k in kw})
    return s


FIXED_ROWS = [
    {"id": "p0", "method": "nabla", "n": 4, "correct": True, "disagree": False, "batch": 1,
     "stats": stats(model_calls=10, model_calls_paper=5, wall_s=3.0, rejections=1, proposals=2, skipped_entropy=2, skipped_gradient=1, positions=10, probes=6, probes_reused=4)},
    {"id": "p1", "method": "nabla", "n": 4, "correct": False, "disagree": True, "batch": 2,
     "stats": stats(model_calls=20, model_calls_paper=7, wall_s=4.0, rejections=0, proposals=0, skipped_entropy=3, skipped_gradient=2, positions=10, probes=4, probes_reused=0)},
    {"id": "p2", "method": "nabla", "n": 4, "correct": True, "disagree": False, "batch": 3, "grade_timed_out": True,
     "stats": stats(model_calls=30, model_calls_paper=9, wall_s=6.0, rejections=3, proposals=6, skipped_entropy=5, skipped_gradient=1, positions=20, probes=10, probes_reused=1)},
    {"id": "p0", "method": "greedy", "n": 1, "correct": False, "disagree": False, "batch": 1, "stats": stats(model_calls=7, model_calls_paper=7, wall_s=1.0)},
]


def test_summary_arithmetic() -> None:
    nabla, greedy = summarize(FIXED_ROWS)
    assert nabla == pytest.approx({
        "method": "nabla", "n": 4, "count": 3, "accuracy": 2 / 3, "model_calls": 20.0, "model_calls_paper": 7.0,
        "wall_s": (3.0 + 4.0 + 6.0) / 3,
        "rejection_rate": 4 / 8, "rejection_rate_generations": 4 / (8 + 3), "skip_entropy_rate": 10 / 40, "skip_gradient_rate": 4 / 40,
        "probe_reuse_rate": 5 / 20, "disagreements": 1, "grade_timeouts": 1,
    })
    assert greedy["rejection_rate"] == greedy["rejection_rate_generations"] == 0.0 and greedy["skip_entropy_rate"] == 0.0 and greedy["accuracy"] == 0.0
    table = to_markdown([nabla, greedy])
    assert "| nabla | 4 | 3 | 66.7% | 20.0 | 7.0 | 4.33 | 50.0% | 36.4% | 25.0% | 10.0% | 25.0% | 1 | 1 |" in table
    old = [{**r, "stats": {k: v for k, v in r["stats"].items() if k != "probes_reused"}} for r in FIXED_ROWS]
    assert summarize(old)[0]["probe_reuse_rate"] == 0.0  # rows from before probe reuse still summarize


def test_write_report_files(tmp_path: Path) -> None:
    complete = [r for r in FIXED_ROWS if r["id"] == "p0"]
    groups = write_report(tmp_path, complete)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"groups": groups}
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 3  # header plus two groups
    for name in ("scaling.png", "cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_run_adds_the_paired_subset(tmp_path: Path) -> None:
    # nabla has p0..p2, greedy only p0: the second table compares them on p0 alone
    groups = write_report(tmp_path, FIXED_ROWS)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["groups"] == groups and [g["count"] for g in groups] == [3, 1]
    assert summary["common_problems"] == 1 and [g["count"] for g in summary["common"]] == [1, 1]
    assert summary["common"][0]["model_calls"] == 10.0
    assert "## The 1 problems every method and N has (paired)" in (tmp_path / "summary.md").read_text()
    for name in ("scaling.png", "cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_task_from_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    path.write_text('{"problem": "1+1?", "final_answer": "2", "unique_id": "a"}\n{"problem": "2+2?", "final_answer": 4}\n')
    task = load_task(str(path), limit=5)
    assert task.problems == [BenchProblem("a", "1+1?", "2"), BenchProblem("1", "2+2?", "4")]
    assert task.system is not None and "\\boxed{}" in task.system
    path.write_text('{"question": "1+1?"}\n')
    with pytest.raises(ValueError, match="final_answer"):
        load_task(str(path))
    with pytest.raises(FileNotFoundError, match="named task"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_load_arith_task() -> None:
    task = load_task("arith:dev", limit=4)
    assert len(task.problems) == 4 and task.name == "arith-dev"
    first = task.problems[0]
    assert task.grade(first.final_answer, first.final_answer).correct
    assert not task.grade(str(int(first.final_answer) + 1), first.final_answer).correct


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bench_cli.add_parsers(parser.add_subparsers())
    return parser


def test_cli_set_values_and_unknown_field() -> None:
    assert bench_cli.parse_sets(["temperature=0.7", 'stop=["\\n\\n"]', "dto_positions=first"]) == {
        "temperature": 0.7, "stop": ["\n\n"], "dto_positions": "first"}
    args = bench_parser().parse_args(["bench", "--data", "arith", "--out", "x", "--set", "temprature=0.7"])
    with pytest.raises(ConfigError, match="unknown NablaConfig field"):
        args.func(args)
    with pytest.raises(ConfigError):
        bench_cli.parse_sets(["temperature"])


def test_cli_merge(tmp_path: Path) -> None:
    for i in range(2):
        run_bench(ScriptedEngine(), make_task(4), ["greedy", "sc"], [2], NablaConfig(), tmp_path, shard=(i, 2))
    args = bench_parser().parse_args(["bench", "--merge", str(tmp_path)])
    assert args.func(args) == 0
    assert len(read_results(tmp_path / "results.jsonl")) == 8
    groups = json.loads((tmp_path / "summary.json").read_text())["groups"]
    assert [(g["method"], g["n"], g["count"]) for g in groups] == [("greedy", 1, 4), ("sc", 2, 4)]


def test_shared_samples_match_separate_runs(tiny_engine, tmp_path: Path) -> None:
    # one scored set of 4 samples per problem must give every (method, N) what its own run gives
    task = make_task(3)
    config = NablaConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
    methods, ns = ["greedy", "bon", "sc", "weighted_bon"], [1, 2, 4]
    separate = run_bench(tiny_engine, task, methods, ns, config, tmp_path / "separate", batch_size=2)
    shared = run_bench(tiny_engine, task, methods, ns, config, tmp_path / "shared", batch_size=2, share_samples=True)
    assert len(shared) == len(separate) == 3 * (1 + 3 * 3)
    by_key = {(r["id"], r["method"], r["n"]): r for r in separate}
    exact = ("policy_forward", "policy_tokens", "rollout_tokens", "reward_forward", "rollouts", "response_tokens", "model_calls")
    for row in shared:
        twin = by_key[(row["id"], row["method"], row["n"])]
        assert (row["text"], row["answer"], row["correct"]) == (twin["text"], twin["answer"], twin["correct"])
        assert {k: row["stats"][k] for k in exact} == {k: twin["stats"][k] for k in exact}
        assert row["reward"] == pytest.approx(twin["reward"], abs=1e-5) if twin["reward"] is not None else row["reward"] is None
        assert row.get("shared_samples") == (4 if row["method"] != "greedy" else None)
    sc = [r for r in shared if r["method"] == "sc"]
    assert all(r["stats"]["reward_forward"] == 0 for r in sc)  # self-consistency never pays for the reward
    # resuming a shared run draws nothing
    assert run_bench(None, task, methods, ns, config, tmp_path / "shared", share_samples=True) == shared  # type: ignore[arg-type]


def test_select_refuses_what_the_set_cannot_give(tiny_engine) -> None:
    request = tiny_engine.request("problem 1")
    (unscored,) = tiny_engine.sample([request], NablaConfig(method="sc", n=2, max_new_tokens=6), scored=False)
    with pytest.raises(ValueError, match="N=3"):
        tiny_engine.select(unscored, NablaConfig(method="sc", n=3))
    with pytest.raises(ValueError, match="scored"):
        tiny_engine.select(unscored, NablaConfig(method="bon", n=2))
    with pytest.raises(ConfigError, match="nabla"):
        tiny_engine.select(unscored, NablaConfig(method="nabla", n=2))


def test_paired_counts_and_sign_test() -> None:
    ours = {0: {"correct": True}, 1: {"correct": True}, 2: {"correct": False}, 3: {"correct": True}, 9: {"correct": False}}
    base = {0: {"correct": False}, 1: {"correct": True}, 2: {"correct": True}, 3: {"correct": False}, 9: {"correct": True}}
    assert paired_counts(ours, base, [0, 1, 2, 3]) == (2, 1)  # problem 9 is not among those compared
    assert sign_test(0, 5) == pytest.approx(2 / 32)  # two-sided: 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert sign_test(27, 18) == pytest.approx(0.2327, abs=1e-4)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
