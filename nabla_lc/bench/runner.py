"""The benchmark runner: problems × methods × N through ``engine.generate``, graded, one JSON line each.

A run is planned as jobs (:class:`BenchJob`: one engine call each), decoded by an :data:`Executor` (this
process's engine, or Ray workers: :mod:`nabla_lc.bench.ray_pipeline`), then graded and written here, by one
process. Results go to ``results.jsonl`` (or ``results.shard-i-of-n.jsonl`` for a shard), appended after every
batch, so an interrupted run resumes where it stopped: a (problem, method, N) already in the file is
never decoded again. Every write goes through :mod:`nabla_lc.bench.output` (atomic replacements, synced
appends, one writer per results file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from tqdm import tqdm

from ..config import NablaConfig
from ..methods import get_method, method_names
from .grading import MATH_INSTRUCTION, Grader, Verdict, extract_answer
from .output import append_jsonl, output_lock, write_atomic, write_jsonl

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
"""File name of an unsharded run's results."""
RUN_INFO = "run.json"
"""File name of the run's settings, checked on resume."""
ARITH_DEFAULT_COUNT = 100
"""Questions in a named ``arith`` task when no limit is given."""
_SHARD_FILE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.jsonl$")


@dataclass(frozen=True)
class BenchProblem:
    """One benchmark question."""

    id: str
    """Unique within the task (the record's ``id`` or ``unique_id``, else its line number)."""
    problem: str
    final_answer: str


@dataclass
class Task:
    """Problems plus how to prompt for, extract and grade their answers."""

    name: str
    problems: list[BenchProblem]
    extract_answer: Callable[[str], "str | None"]
    """Final answer of a response; also what self-consistency and weighted BoN vote on."""
    grade: Callable[["str | None", str], Verdict]
    """``grade(answer, final_answer)``."""
    system: str | None = MATH_INSTRUCTION
    """System message of every prompt (the problem is the user message)."""
    info: dict[str, Any] = field(default_factory=dict)
    """What identifies the task in ``run.json`` (source path or generator arguments; not the limit,
    since a longer run only adds problems)."""


class BenchEngine(Protocol):
    """What the runner needs from :class:`nabla_lc.facade.Engine` (tests script a fake one)."""

    def request(self, prompt: str, *, chat: bool = True, system: str | None = None, seed: int | None = None) -> Any: ...

    def generate(
        self, requests: list[Any], config: NablaConfig | None = None, *, extract_answer: Callable[[str], "str | None"] | None = None
    ) -> list[Any]: ...

    def sample(self, requests: list[Any], config: NablaConfig, *, scored: bool, extract_answer: Callable[[str], "str | None"] | None = None) -> list[Any]: ...

    def select(self, sample_set: Any, config: NablaConfig, extract_answer: Callable[[str], "str | None"] | None = None) -> Any: ...


def load_task(spec: str, *, limit: int | None = None, grader: Grader | None = None) -> Task:
    """A task from a JSONL path (fields ``problem``, ``final_answer``) or a name: ``arith``, ``arith:dev``, ``arith:test``.

    ``limit`` keeps the first problems. JSONL tasks are graded by ``grader`` (a new :class:`Grader` by
    default); ``arith`` is graded by its own exact integer check.
    """
    if spec == "arith" or spec.startswith("arith:"):
        return _arith_task(spec, limit)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec!r} is neither a file nor a named task (arith, arith:dev, arith:test)")
    problems = _read_jsonl_problems(path)[:limit]
    grader = grader or Grader()
    return Task(path.stem, problems, extract_answer, grader.grade, info={"data": str(path.resolve())})


def _read_jsonl_problems(path: Path) -> list[BenchProblem]:
    problems = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f):
            record = json.loads(line)
            if "problem" not in record or "final_answer" not in record:
                raise ValueError(f"{path}:{number + 1}: a record needs 'problem' and 'final_answer'")
            key = record.get("id", record.get("unique_id", number))
            problems.append(BenchProblem(str(key), record["problem"], str(record["final_answer"])))
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: problem ids are not unique")
    return problems


def _arith_task(spec: str, limit: int | None) -> Task:
    from . import arith

    split = spec.partition(":")[2] or "test"
    if split not in ("dev", "test"):
        raise ValueError(f"unknown arith split {split!r}; use arith:dev or arith:test")
    count = limit or ARITH_DEFAULT_COUNT
    problems = [BenchProblem(p.id, p.problem, p.final_answer) for p in arith.make_problems(split, count)]  # type: ignore[arg-type]

    def grade(answer: str | None, final_answer: str) -> Verdict:
        return Verdict(arith.check(answer, final_answer))

    info = {"data": f"arith:{split}", "level": arith.DEFAULT_LEVEL}
    return Task(f"arith-{split}", problems, arith.extract_answer, grade, info=info)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--shard must look like i/n with 0 <= i < n, got {spec!r}")
    return int(match.group(1)), int(match.group(2))


def results_path(out_dir: Path, shard: tuple[int, int] | None = None) -> Path:
    """Where a run (or one shard of it) writes its results."""
    return Path(out_dir) / (RESULTS if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl")


def jobs(methods: Sequence[str], ns: Sequence[int]) -> list[tuple[str, int]]:
    """The (method, N) pairs to run; a method that ``runs_once`` (greedy) once, with N = 1."""
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(method_names())}")
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"N values must be integers >= 1, got {list(ns)}")
    return [(m, n) for m in methods for n in ([1] if get_method(m).runs_once else ns)]


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file, repairing what a crash left (callers hold :func:`output_lock` of ``path``).

    A line cut by a crash is dropped; a last row whose newline was cut is kept, and the file is rewritten
    (atomically) so the next row starts on a line of its own.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: dropping an unreadable line (an interrupted write): %.60s", path, line)
    if len(rows) != len(lines) or (text and not text.endswith("\n")):
        write_jsonl(path, rows)
    return rows


@dataclass(frozen=True)
class BenchJob:
    """One engine call's work: a (method, N) over a batch of problems, or one shared sample set.

    A job is the unit a worker decodes and the writer writes whole: its rows are appended together or not at all.
    """

    config: NablaConfig
    """The decoding config (method and N set; for a shared set, the method that scores it at max(N))."""
    items: tuple[tuple[int, BenchProblem], ...]
    """(task index, problem) pairs; the index sets the request seed."""
    shared: tuple[tuple[str, int], ...] = ()
    """For a shared sample set: the (method, N) rows selected from it; empty for a plain batch."""
    skip: frozenset[tuple[str, str, int]] = frozenset()
    """For a shared sample set: its (problem, method, N) rows already in the results file."""

    @property
    def label(self) -> str:
        """The job's methods and N, for the progress bar."""
        if self.shared:
            return f"{'+'.join(dict.fromkeys(m for m, _ in self.shared))} n={self.config.n} (shared)"
        return f"{self.config.method} n={self.config.n}"


@dataclass(frozen=True)
class Decoded:
    """One (problem, method, N) as the engine answered it, before grading (what a worker sends back)."""

    config: NablaConfig
    """The row's method and N (for a shared set, the selecting config)."""
    index: int
    problem: BenchProblem
    seed: int | None
    result: Any
    """The engine's :class:`~nabla_lc.engine.types.Result`."""
    shared_samples: int | None = None
    """The size of the shared sample set the row was selected from, if any."""


Executor = Callable[[Sequence[BenchJob]], Iterator[tuple[BenchJob, list[Decoded]]]]
"""Decodes jobs and yields each with its outcomes as it completes, in any order, each job exactly once."""


def local_executor(engine: BenchEngine, task: Task) -> Executor:
    """Decode the jobs one after another with ``engine``, in this process."""

    def execute(jobs: Sequence[BenchJob]) -> Iterator[tuple[BenchJob, list[Decoded]]]:
        return ((job, decode_job(engine, job, task.system, task.extract_answer)) for job in jobs)

    return execute


def run_bench(
    engine: BenchEngine,
    task: Task,
    methods: Sequence[str],
    ns: Sequence[int],
    base_config: NablaConfig,
    out_dir: Path | str,
    *,
    batch_size: int = 1,
    shard: tuple[int, int] | None = None,
    run_info: dict[str, Any] | None = None,
    share_samples: bool = False,
) -> list[dict[str, Any]]:
    """Decode and grade every (problem, method, N) not yet in the results file with ``engine``; return all its rows.

    Problem ``i`` of the task belongs to shard ``(i mod n)``; its request seed is ``base_config.seed + i``
    (so a shard, a batch size or a resume never changes a problem's seed). ``batch_size`` problems go to
    each ``engine.generate`` call. ``run_info`` (model names and the like) is stored in ``run.json`` with the
    task and config; a rerun into the same directory with different settings is refused, and so is a second
    run into a results file in use (:class:`~nabla_lc.bench.output.OutputInUseError`, naming the lock).

    ``share_samples``: the methods that share samples (bon, sc and weighted_bon) at every N come from one set of max(N) samples per problem,
    scored once (the engine's ``sample``/``select``). Answers and model calls are those of separate runs;
    wall time below the largest N is the set's time scaled by N / max(N), and such rows say ``shared_samples``.
    """
    return run_jobs(
        local_executor(engine, task), task, methods, ns, base_config, out_dir,
        batch_size=batch_size, shard=shard, run_info=run_info, share_samples=share_samples,
    )


def run_jobs(
    execute: Executor,
    task: Task,
    methods: Sequence[str],
    ns: Sequence[int],
    base_config: NablaConfig,
    out_dir: Path | str,
    *,
    batch_size: int = 1,
    shard: tuple[int, int] | None = None,
    run_info: dict[str, Any] | None = None,
    share_samples: bool = False,
) -> list[dict[str, Any]]:
    """:func:`run_bench` with the decoding done by ``execute`` (in this process, or by Ray workers).

    This process alone grades and writes: each completed job's rows are appended at once, so a job
    decoded twice (a worker that died after starting it) is still written once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, shard)
    with output_lock(path):  # why: two runs into one results file would interleave and duplicate rows
        _check_run_info(out_dir, {"task": task.info, "config": _base_dict(base_config), **(run_info or {})})
        rows = read_results(path)
        done = {(r["id"], r["method"], r["n"]) for r in rows}
        planned = plan_jobs(task, methods, ns, base_config, done, batch_size=batch_size, shard=shard, share_samples=share_samples)
        total = sum(_row_count(job) for job in planned)
        log.info("%s: %d (problem, method, N) items to run in %d jobs", path, total, len(planned))
        with path.open("a", encoding="utf-8") as out, tqdm(total=total, desc=task.name, unit="item") as bar:
            for job, decoded in execute(planned):
                new = job_rows(task, job, decoded)
                append_jsonl(out, new)
                rows.extend(new)
                bar.set_postfix_str(job.label)
                bar.update(len(new))
        return rows


def plan_jobs(
    task: Task,
    methods: Sequence[str],
    ns: Sequence[int],
    base_config: NablaConfig,
    done: set[tuple[str, str, int]],
    *,
    batch_size: int = 1,
    shard: tuple[int, int] | None = None,
    share_samples: bool = False,
) -> list[BenchJob]:
    """The jobs that decode every (problem, method, N) of the shard not in ``done``, in the order a single process runs them."""
    indexed = [(i, p) for i, p in enumerate(task.problems) if shard is None or i % shard[1] == shard[0]]
    pairs = jobs(methods, ns)
    shared = tuple((m, n) for m, n in pairs if share_samples and get_method(m).shares_samples)
    planned = []
    for method, n in pairs:
        if (method, n) in shared:
            continue
        items = [(i, p) for i, p in indexed if (p.id, method, n) not in done]
        config = base_config.replace(method=method, n=n)
        planned += [BenchJob(config, tuple(items[s : s + batch_size])) for s in range(0, len(items), batch_size)]
    if shared:
        items = [(i, p) for i, p in indexed if any((p.id, m, n) not in done for m, n in shared)]
        drawn = max(n for _, n in shared)
        scored = [m for m, _ in shared if get_method(m).needs_reward]
        config = base_config.replace(method=scored[0] if scored else shared[0][0], n=drawn)
        for s in range(0, len(items), batch_size):
            batch = tuple(items[s : s + batch_size])
            skip = frozenset((p.id, m, n) for _, p in batch for m, n in shared if (p.id, m, n) in done)
            planned.append(BenchJob(config, batch, shared, skip))
    return planned


def _row_count(job: BenchJob) -> int:
    if not job.shared:
        return len(job.items)
    return sum((p.id, m, n) not in job.skip for _, p in job.items for m, n in job.shared)


def task_requests(engine: BenchEngine, system: str | None, config: NablaConfig, items: Sequence[tuple[int, BenchProblem]]) -> tuple[list[Any], list[int | None]]:
    """The chat requests for ``items`` (under the task's ``system`` message), problem ``i`` seeded ``config.seed + i``."""
    seeds = [None if config.seed is None else config.seed + i for i, _ in items]
    return [engine.request(p.problem, chat=True, system=system, seed=s) for (_, p), s in zip(items, seeds)], seeds


def decode_job(engine: BenchEngine, job: BenchJob, system: str | None, extract_answer: Callable[[str], "str | None"]) -> list[Decoded]:
    """Decode one job (a worker's whole part: no grading, no writing)."""
    if job.shared:
        return _decode_shared(engine, job, system, extract_answer)
    requests, seeds = task_requests(engine, system, job.config, job.items)
    results = engine.generate(requests, job.config, extract_answer=extract_answer)
    return [Decoded(job.config, index, problem, seed, result) for (index, problem), seed, result in zip(job.items, seeds, results)]


def _decode_shared(engine: BenchEngine, job: BenchJob, system: str | None, extract_answer: Callable[[str], "str | None"]) -> list[Decoded]:
    """One sample set per problem at max(N) (scored when the job's method needs the reward), then a selection for every
    shared (method, N) not yet done."""
    requests, seeds = task_requests(engine, system, job.config, job.items)
    sets = engine.sample(requests, job.config, scored=get_method(job.config.method).needs_reward, extract_answer=extract_answer)
    decoded = []
    for method, n in job.shared:
        select_config = job.config.replace(method=method, n=n)
        for (index, problem), seed, sample_set in zip(job.items, seeds, sets):
            if (problem.id, method, n) not in job.skip:
                result = engine.select(sample_set, select_config, extract_answer)
                decoded.append(Decoded(select_config, index, problem, seed, result, shared_samples=job.config.n))
    return decoded


def job_rows(task: Task, job: BenchJob, decoded: Sequence[Decoded]) -> list[dict[str, Any]]:
    """The graded rows of a decoded job."""
    return [_row(task, d, len(job.items)) for d in decoded]


def _row(task: Task, decoded: Decoded, batch: int) -> dict[str, Any]:
    result, problem = decoded.result, decoded.problem
    answer = result.answer if result.answer is not None else task.extract_answer(result.text)
    verdict = task.grade(answer, problem.final_answer)
    row = {
        "id": problem.id,
        "index": decoded.index,
        "method": decoded.config.method,
        "n": decoded.config.n,
        "seed": decoded.seed,
        "answer": answer,
        "final_answer": problem.final_answer,
        "correct": verdict.correct,
        "math_verify": verdict.math_verify,
        "normalized": verdict.normalized,
        "disagree": verdict.disagree,
        "grade_timed_out": verdict.timed_out,
        "reward": result.reward,
        "finish_reason": result.finish_reason,
        "batch": batch,
        "stats": result.stats.to_dict(),
        "text": result.text,
    }
    return row if decoded.shared_samples is None else {**row, "shared_samples": decoded.shared_samples}


def merge_results(out_dir: Path | str) -> list[dict[str, Any]]:
    """Join ``results.jsonl`` and every ``results.shard-i-of-n.jsonl`` in ``out_dir`` into ``results.jsonl``.

    Rows are deduplicated by (problem, method, N) and ordered by method (first seen), N and problem index.
    """
    out_dir = Path(out_dir)
    paths = sorted(p for p in out_dir.iterdir() if _SHARD_FILE.match(p.name))
    if not paths and not (out_dir / RESULTS).exists():
        raise FileNotFoundError(f"no results.jsonl or results.shard-i-of-n.jsonl in {out_dir}")
    with contextlib.ExitStack() as locks:
        for path in [out_dir / RESULTS, *paths]:  # why: a shard still running is an error, not a half-merged file
            locks.enter_context(output_lock(path))
        rows = sort_rows(_unique(r for p in [out_dir / RESULTS, *paths] for r in read_results(p)))
        write_jsonl(out_dir / RESULTS, rows)
    log.info("merged %d shard file(s) into %s: %d rows", len(paths), out_dir / RESULTS, len(rows))
    return rows


def sort_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ordered by method (first seen), N and problem index: the order of an unsharded run."""
    rows = list(rows)
    order = {m: k for k, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    return sorted(rows, key=lambda r: (order[r["method"]], r["n"], r["index"]))


def _unique(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        seen.setdefault((r["id"], r["method"], r["n"]), r)
    return list(seen.values())


def _base_dict(config: NablaConfig) -> dict[str, Any]:
    """The config without the fields each (method, N) sets."""
    return {k: v for k, v in config.to_dict().items() if k not in ("method", "n")}


def _check_run_info(out_dir: Path, info: dict[str, Any]) -> None:
    path = out_dir / RUN_INFO
    info = json.loads(json.dumps(info))  # why: compare in JSON form (tuples become lists)
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != info:
            changed = [k for k in sorted(set(stored) | set(info)) if k != "config" and stored.get(k) != info.get(k)]
            old, new = stored.get("config", {}), info.get("config", {})
            # why: a NablaConfig field added after the run was stored, at its default, decodes as the run did
            defaults = json.loads(json.dumps(_base_dict(NablaConfig())))
            old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
            changed += [f"config.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if changed:
                raise ValueError(f"{out_dir} holds results made with other settings ({', '.join(changed)} differ); use a new --out")
        return
    write_atomic(path, json.dumps(info, indent=2) + "\n")  # why atomic: concurrent shards may write it at once
