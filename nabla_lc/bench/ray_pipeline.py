"""``nabla-lc bench --ray``: the bench's jobs decoded by a pool of Ray actors, each holding one engine.

The driver plans the jobs (:func:`~nabla_lc.bench.runner.plan_jobs`), hands one at a time to each idle
worker, and grades and writes each job's rows itself when the job comes back
(:func:`~nabla_lc.bench.runner.run_jobs`), so the results file, its lock, its resumption and its rows are
those of a single-process run. What crosses the network is a job (prompts, config) and its results
(texts, token ids, counts); each worker loads its models from its own node's disk.

A worker that dies (a crash, an out-of-memory kill, ``ray.kill``, a lost node) is replaced, and the job
it held goes to the next idle worker: a job's rows are written only when its results arrive, so a retried
job is written once. A job is tried at most ``max_attempts`` times; an error raised by the engine itself
(bad input, a bug) is not retried.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from .runner import BenchEngine, BenchJob, Decoded, Executor, Task, decode_job

log = logging.getLogger(__name__)

EngineFactory = Callable[[], BenchEngine]
"""Builds a worker's engine inside the worker (it is pickled and sent to every worker, so a module-level
function or a ``functools.partial`` of one)."""
WORKER_NAME = "nabla-bench-worker"
"""Workers are named ``nabla-bench-worker-<slot>.<generation>`` (visible in ``ray list actors`` and the dashboard)."""


@dataclass(frozen=True)
class WorkerShape:
    """How many workers, and what each one reserves."""

    count: int
    cpus: int
    """CPUs reserved per worker, also its torch thread count."""
    gpus: float
    """GPUs reserved per worker (0 on a CPU-only cluster)."""


def worker_shape(resources: dict[str, float], workers: int | None = None) -> WorkerShape:
    """One worker per GPU where the cluster has GPUs, else one per CPU; ``workers`` overrides the count.

    CPU workers split the cluster's CPUs evenly (at least one each); more workers than CPUs (or, with GPUs,
    than GPUs) is refused, because the extra workers could never be placed and their jobs would wait forever.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if gpus:
        count = workers or gpus
        if count > gpus:
            raise ValueError(f"--workers {count} exceeds the cluster's {gpus} GPU(s); use at most one worker per GPU")
        return WorkerShape(count, 1, 1.0)
    count = workers or cpus
    if count < 1 or count > cpus:
        raise ValueError(f"--workers {count} exceeds the cluster's {cpus} CPU(s); use at most one worker per CPU")
    return WorkerShape(count, cpus // count, 0.0)


class BenchWorker:
    """A Ray actor holding one engine: decodes jobs, never grades or writes."""

    def __init__(self, factory: EngineFactory, threads: int, system: str | None, extract_answer: Callable[[str], "str | None"]) -> None:
        torch.set_num_threads(threads)  # why: one thread per reserved CPU, so workers on one node do not oversubscribe it
        self.engine = factory()
        self.system = system
        self.extract_answer = extract_answer

    def decode(self, job: BenchJob) -> list[Decoded]:
        return decode_job(self.engine, job, self.system, self.extract_answer)


class RayExecutor:
    """An :data:`~nabla_lc.bench.runner.Executor` over a pool of :class:`BenchWorker` actors (one job in flight each)."""

    def __init__(self, factory: EngineFactory, task: Task, shape: WorkerShape, *, max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.factory, self.task, self.shape, self.max_attempts = factory, task, shape, max_attempts
        self._generation = itertools.count()
        self._remote = ray.remote(BenchWorker)

    def _start(self, slot: int) -> ray.actor.ActorHandle:
        name = f"{WORKER_NAME}-{slot}.{next(self._generation)}"
        options = self._remote.options(name=name, num_cpus=self.shape.cpus, num_gpus=self.shape.gpus, max_restarts=0)
        return options.remote(self.factory, self.shape.cpus, self.task.system, self.task.extract_answer)

    def __call__(self, jobs: Sequence[BenchJob]) -> Iterator[tuple[BenchJob, list[Decoded]]]:
        if not jobs:
            return
        queue = collections.deque((job, 1) for job in jobs)  # (job, attempt)
        workers = [self._start(slot) for slot in range(min(self.shape.count, len(jobs)))]
        idle = list(range(len(workers)))
        running: dict[ray.ObjectRef, tuple[int, BenchJob, int]] = {}
        try:
            while queue or running:
                while queue and idle:
                    slot = idle.pop()
                    job, attempt = queue.popleft()
                    running[workers[slot].decode.remote(job)] = (slot, job, attempt)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                slot, job, attempt = running.pop(ref)
                try:
                    decoded = ray.get(ref)
                except RayActorError as err:
                    if attempt >= self.max_attempts:
                        raise RuntimeError(f"a Ray worker died on the job {job.label} with problems {[p.id for _, p in job.items]} "
                                           f"{attempt} time(s); giving up: {err}") from err
                    log.warning("a Ray worker died during the job %s (attempt %d); starting another and retrying: %s", job.label, attempt, err)
                    workers[slot] = self._start(slot)
                    queue.appendleft((job, attempt + 1))
                else:
                    yield job, decoded
                idle.append(slot)
        finally:
            for worker in workers:  # why: an error or an interrupt must not leave engines holding the cluster's CPUs and GPUs
                ray.kill(worker)


@contextlib.contextmanager
def ray_cluster(address: str | None = None) -> Iterator[dict[str, float]]:
    """Connect to the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs here; None: a new local one),
    or use the one this process already joined; yield its resources. A cluster started here is shut down at the end."""
    started = not ray.is_initialized()
    if started and address is None:
        ray.init(include_dashboard=False)  # why no dashboard: a throwaway local cluster, and its processes cost CPU
    elif started:
        ray.init(address=address)
    elif address is not None:
        log.warning("this process already joined a Ray cluster; --address %s is not used", address)
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()


def ray_executor(factory: EngineFactory, task: Task, resources: dict[str, float], workers: int | None = None) -> Executor:
    """The executor for :func:`~nabla_lc.bench.runner.run_jobs`: ``workers`` (default: one per GPU, else per CPU) :class:`BenchWorker` s."""
    shape = worker_shape(resources, workers)
    log.info("Ray bench: %d worker(s), each %d CPU(s) / thread(s) and %g GPU(s)", shape.count, shape.cpus, shape.gpus)
    return RayExecutor(factory, task, shape)
