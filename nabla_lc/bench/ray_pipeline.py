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
import itertools
import logging
from typing import Callable, Iterator, Sequence

import ray
import torch
from ray.exceptions import RayActorError

from ..cluster import WorkerShape, worker_shape
from .runner import BenchEngine, BenchJob, Decoded, Executor, Task, decode_job

log = logging.getLogger(__name__)

EngineFactory = Callable[[], BenchEngine]
"""Builds a worker's engine inside the worker (it is pickled and sent to every worker, so a module-level
function or a ``functools.partial`` of one)."""
WORKER_NAME = "nabla-bench-worker"
"""Workers are named ``nabla-bench-worker-<slot>.<generation>`` (visible in ``ray list actors`` and the dashboard)."""


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
                    ray.kill(workers[slot])  # why: one only unreachable (not dead) must not keep its CPUs or GPU
                    workers[slot] = self._start(slot)
                    queue.appendleft((job, attempt + 1))
                else:
                    yield job, decoded
                idle.append(slot)
        finally:
            for worker in workers:  # why: an error or an interrupt must not leave engines holding the cluster's CPUs and GPUs
                ray.kill(worker)


def ray_executor(factory: EngineFactory, task: Task, resources: dict[str, float], workers: int | None = None) -> Executor:
    """The executor for :func:`~nabla_lc.bench.runner.run_jobs`: ``workers`` (default: one per GPU, else per CPU) :class:`BenchWorker` s."""
    shape = worker_shape(resources, workers)
    log.info("Ray bench: %d worker(s), each %d CPU(s) / thread(s) and %g GPU(s)", shape.count, shape.cpus, shape.gpus)
    return RayExecutor(factory, task, shape)
