"""``nabla-lc bench --ray``: a local Ray cluster (2 CPUs, conftest's ``ray_cluster``) decodes the bench's jobs on tiny engines.

The rows must be those of a single-process run, and a worker killed in the middle of a job must cost a retry,
never a lost or a duplicated row.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'nabla-lc[ray]')")

from nabla_lc import NablaConfig  # noqa: E402
from nabla_lc.bench.ray_pipeline import WORKER_NAME, ray_executor  # noqa: E402
from nabla_lc.bench.runner import load_task, read_results, results_path, run_bench, run_jobs  # noqa: E402
from nabla_lc.cli import bench as bench_cli  # noqa: E402
from nabla_lc.cli import main  # noqa: E402
from nabla_lc.cluster import WorkerShape, worker_shape  # noqa: E402

from .test_bench import bench_parser  # noqa: E402
from .tiny import make_engine, make_policy, make_tokenizer  # noqa: E402

METHODS, NS = ["greedy", "bon"], [2]
CONFIG = NablaConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=100)
VICTIM_SEED = CONFIG.seed + 5  # problem 5's request seed: the job the killed worker is decoding
STALL_S = 600.0
"""Bound of the victim's stall and of the killer's wait: far beyond how long Ray takes to start workers on busy
cores (a 60 s stall and a 120 s wait once ran out under load), so the verdict does not depend on machine speed."""


class StallingEngine:
    """The tiny engine, except that the first worker to get problem 5's Best-of-2 job names itself in
    ``gate/victim`` and stalls there until the test kills it (at most :data:`STALL_S`)."""

    def __init__(self, gate: Path) -> None:
        self.engine, self.gate = make_engine(), gate

    def __getattr__(self, name: str):  # request, sample, select: the tiny engine's
        return getattr(self.engine, name)

    def generate(self, requests, config=None, *, extract_answer=None):
        if config.method == "bon" and any(r.seed == VICTIM_SEED for r in requests):
            try:
                fd = os.open(self.gate / "victim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # the retry, on another worker: decode normally
            else:
                os.write(fd, ray.get_runtime_context().get_actor_name().encode())
                os.close(fd)
                deadline = time.monotonic() + STALL_S
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                raise RuntimeError("the test never killed this worker")
        return self.engine.generate(requests, config, extract_answer=extract_answer)


def stalling_engine(gate: Path) -> StallingEngine:
    return StallingEngine(gate)


def comparable(rows: list[dict]) -> dict[tuple, dict]:
    """Rows by (problem, method, N), without the wall time (the only field a machine's speed sets)."""
    return {(r["id"], r["method"], r["n"]): {**r, "stats": {**r["stats"], "wall_s": None}} for r in rows}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> list[dict]:
    task = load_task("arith:test", limit=8)
    return run_bench(make_engine(), task, METHODS, NS, CONFIG, tmp_path_factory.mktemp("single"), batch_size=2)


def test_ray_rows_equal_the_single_process_run_though_a_worker_is_killed(ray_cluster, single_process, tmp_path: Path, caplog) -> None:
    # one run checks both (Ray workers start slowly on 2 busy cores): the rows of 2 workers, one killed mid-job, are the single process's
    task = load_task("arith:test", limit=8)
    assert worker_shape(ray_cluster, 2) == WorkerShape(2, 1, 0.0)
    gate = tmp_path / "gate"
    gate.mkdir()
    killed: list[str] = []

    def kill_the_victim() -> None:
        deadline, name = time.monotonic() + STALL_S, ""
        while time.monotonic() < deadline and not name:  # why: the victim creates the file, then writes its name
            time.sleep(0.05)
            name = (gate / "victim").read_text() if (gate / "victim").exists() else ""
        ray.kill(ray.get_actor(name))
        killed.append(name)

    killer = threading.Thread(target=kill_the_victim, daemon=True)
    killer.start()
    execute = ray_executor(functools.partial(stalling_engine, gate), task, ray_cluster, workers=2)
    with caplog.at_level(logging.WARNING, logger="nabla_lc.bench.ray_pipeline"):
        rows = run_jobs(execute, task, METHODS, NS, CONFIG, tmp_path / "out", batch_size=2)
    killer.join(timeout=5)
    assert killed and killed[0].startswith(WORKER_NAME)
    assert "a Ray worker died during the job bon n=2" in caplog.text
    written = read_results(results_path(tmp_path / "out"))
    assert written == rows and len(single_process) == 8 * 2
    assert len(written) == len({(r["id"], r["method"], r["n"]) for r in written}) == 8 * 2  # every row, exactly once
    assert comparable(written) == comparable(single_process)  # texts, answers, rewards, counts, seeds, batch sizes
    # a rerun resumes: nothing left to decode, so no worker is even started
    assert run_jobs(ray_executor(make_engine, task, ray_cluster, workers=2), task, METHODS, NS, CONFIG, tmp_path / "out", batch_size=2) == rows


def test_cli_bench_ray_loads_the_model_flags_in_each_worker(ray_cluster, tmp_path: Path) -> None:
    # the command's own path: the flags pickled to the workers, each loading the policy from disk
    tokenizer = make_tokenizer()
    make_policy(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    flags = ["bench", "--data", "arith:test", "--limit", "4", "--methods", "greedy", "--policy", str(tmp_path / "policy"), "--reward", "none",
             "--device", "cpu", "--set", "max_new_tokens=8"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "single")]) == 0
    assert main([*flags, "--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    single, ray_rows = (read_results(results_path(tmp_path / name)) for name in ("single", "ray"))
    assert len(single) == 4 and comparable(ray_rows) == comparable(single)
    assert (tmp_path / "ray" / "summary.md").exists()


def test_worker_shape() -> None:
    assert worker_shape({"CPU": 16.0}) == WorkerShape(16, 1, 0.0)
    assert worker_shape({"CPU": 16.0}, 4) == WorkerShape(4, 4, 0.0)
    assert worker_shape({"CPU": 16.0, "GPU": 2.0}) == WorkerShape(2, 1, 1.0)
    with pytest.raises(ValueError, match="GPU"):
        worker_shape({"CPU": 16.0, "GPU": 2.0}, 3)
    with pytest.raises(ValueError, match="CPU"):
        worker_shape({"CPU": 2.0}, 3)
    with pytest.raises(ValueError, match=">= 1"):
        worker_shape({"CPU": 2.0}, 0)


def test_cli_ray_flags() -> None:
    args = bench_parser().parse_args(["bench", "--data", "arith", "--out", "x", "--workers", "2"])
    with pytest.raises(ValueError, match="need --ray"):
        args.func(args)
    args = bench_parser().parse_args(["bench", "--data", "arith", "--out", "x", "--ray", "--shard", "0/2"])
    with pytest.raises(ValueError, match="exclude each other"):
        bench_cli.run(args)
