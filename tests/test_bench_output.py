"""The bench's output directory under crashes and concurrent runs: no row is ever lost or duplicated."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nabla_lc.bench.output import OutputInUseError, output_lock
from nabla_lc.bench.runner import merge_results, read_results, results_path, run_bench
from nabla_lc.cli import bench as bench_cli
from nabla_lc.cli import main
from nabla_lc.config import NablaConfig

from .test_bench import METHODS, NS, ScriptedEngine, make_task, strip_batch

# The child repairs a results file whose last line a crash cut, and is killed (SIGKILL) at its first write to
# any file: wherever that write goes, the rows already in the file must survive.
KILLED_REPAIR = """
import os, signal, sys
from pathlib import Path
from nabla_lc.bench.runner import read_results

def kill_at_first_file_write(frame, event, func):
    name = getattr(getattr(func, "__self__", None), "name", None)  # a file's path; "<stderr>" for the log's warning
    if event == "c_call" and func.__name__ == "write" and isinstance(name, str) and not name.startswith("<"):
        os.kill(os.getpid(), signal.SIGKILL)

sys.setprofile(kill_at_first_file_write)  # why a profile hook: it sees C calls, so it stops any implementation mid-repair
read_results(Path(sys.argv[1]))
"""


def test_a_kill_during_the_resume_repair_loses_no_row(tmp_path: Path) -> None:
    rows = [{"id": f"p{k}", "method": "bon", "n": 4, "text": "x" * 200} for k in range(3000)]
    path = tmp_path / "results.jsonl"
    complete = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(complete + '{"id": "p3000", "met')  # the crash that makes the next run repair the file
    child = subprocess.run([sys.executable, "-c", KILLED_REPAIR, str(path)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_text().startswith(complete)  # once 0 bytes: the file was truncated before being rewritten
    with output_lock(path):  # as the next run takes it: the killed writer's temporary file goes
        assert read_results(path) == rows and path.read_text() == complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "results.jsonl.lock"]


def test_a_row_whose_newline_was_cut_is_kept_and_the_next_starts_a_line(tmp_path: Path) -> None:
    full = run_bench(ScriptedEngine(), make_task(), METHODS, NS, NablaConfig(), tmp_path / "full")
    lines = (tmp_path / "full" / "results.jsonl").read_text().splitlines(keepends=True)
    path = results_path(tmp_path / "part")
    path.parent.mkdir()
    path.write_text("".join(lines[:9]) + lines[9].rstrip("\n"))  # cut after the tenth row, before its newline
    engine = ScriptedEngine()
    rows = run_bench(engine, make_task(), METHODS, NS, NablaConfig(), tmp_path / "part")
    assert sum(len(seeds) for _, _, seeds in engine.calls) == len(full) - 10  # the tenth row counts as done
    assert strip_batch(rows) == strip_batch(full)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows  # every line one row


def test_a_second_run_into_a_results_file_in_use_is_refused_naming_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "results.jsonl.lock"
    with output_lock(results_path(tmp_path)):
        with pytest.raises(OutputInUseError, match=f"holds the lock {lock}"):
            run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)
        run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path, shard=(0, 2))  # shards may share it
        with pytest.raises(OutputInUseError, match="results.jsonl.lock"):
            merge_results(tmp_path)
    assert not read_results(results_path(tmp_path))
    assert len(run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)) == 2  # released


def test_a_second_bench_command_into_a_directory_in_use_exits_2_naming_the_lock(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_cli, "load_engine", lambda args, config: ScriptedEngine())
    argv = ["bench", "--data", "arith", "--limit", "2", "--methods", "greedy", "--reward", "none", "--out", str(tmp_path)]
    with output_lock(results_path(tmp_path)):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nabla-lc: error: another nabla-lc bench is writing") and f"{tmp_path}/results.jsonl.lock" in err
    assert err.count("\n") == 1 and not (tmp_path / "results.jsonl").exists()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    hold = f"from pathlib import Path; from nabla_lc.bench.output import output_lock; l = output_lock(Path({str(tmp_path / 'results.jsonl')!r})); l.__enter__(); print('held', flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(OutputInUseError):
            run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / "results.jsonl.lock").exists()
    assert len(run_bench(ScriptedEngine(), make_task(2), ["greedy"], [1], NablaConfig(), tmp_path)) == 2
