"""Continuous batching: one thread owns the models and samples the rollouts of every job in flight together.

Every submitted job (a method's batch of requests, a sample set) is a :data:`~nabla_lc.engine.rollout.Job`: it
runs its own work (probes, DTO, scoring) until it needs rollouts, then waits. At each boundary the scheduler
admits new jobs, drops cancelled ones, and samples the rows of all waiting jobs in one :func:`rollout` per sampling
setting; a cancelled job's rows leave that batch at the next token. Each row keeps its own seeded generator, so a
job's outcome does not depend on what else is in flight. Jobs that are not generators (a method registered without
``steps``, :meth:`Scheduler.call`) run alone between batches.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from .engine.policy import Policy
from .engine.rollout import Job, Rollout, RolloutCall, rollout

log = logging.getLogger(__name__)

T = TypeVar("T")

ARRIVAL_WINDOW_S = 0.01
"""When the scheduler is idle and a job arrives, it waits this long for others (again after each arrival, at most
:data:`ARRIVAL_CAP_S` in all) before starting, so that requests sent together start in one batch. A job that arrives
while others run joins them at the next boundary without waiting."""
ARRIVAL_CAP_S = 0.05

IDLE_EXIT_S = 2.0
"""Seconds the scheduler thread waits for work before it exits (the next submit starts another), so that an
engine nobody uses holds no thread and can be garbage-collected."""


@dataclass(eq=False)
class _Task:
    """A submitted job (or a plain function) and the future of its outcome."""

    future: Future[Any]
    job: Job[Any] | None
    function: Callable[[], Any] | None = None
    call: RolloutCall | None = None
    """The rollouts it waits on."""
    error: BaseException | None = None
    """Raised by its ``on_token`` during a batch; the task fails at the next boundary."""

    def gone(self) -> bool:
        return self.future.cancelled() or self.error is not None


@dataclass
class SchedulerStats:
    """What the scheduler did, for tests and metrics."""

    batches: int = 0
    """:func:`rollout` calls."""
    rows: int = 0
    """Rows sampled in them."""
    tokens: int = 0
    """Tokens sampled in them."""
    jobs: int = 0
    """Jobs and functions finished (with a result, an error or cancelled)."""
    cancelled: int = 0
    """Jobs dropped because their future was cancelled."""
    max_rows: int = 0
    """Most rows in one batch."""
    sizes: list[int] = field(default_factory=list)
    """Jobs per batch, the last 1000."""


class Scheduler:
    """Runs jobs on one thread, batching their rollouts. ``lock`` is held while the models are in use, so other
    code that uses them directly (``nabla_lc.diagnose``) excludes the scheduler by holding it too."""

    def __init__(self, policy: Policy, lock: threading.RLock) -> None:
        self.policy = policy
        self.lock = lock
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._incoming: list[_Task] = []
        self._thread: threading.Thread | None = None

    # --- callers --------------------------------------------------------------------------
    def submit(self, job: Job[T]) -> Future[T]:
        """Queue ``job``; its future holds what it returns. Cancelling the future stops it at the next token."""
        return self._queue(_Task(Future(), job))

    def call(self, function: Callable[[], T]) -> Future[T]:
        """Run ``function`` on the scheduler's thread, alone, between batches."""
        return self._queue(_Task(Future(), None, function))

    def on_thread(self) -> bool:
        """Whether the caller is the scheduler's thread (a job that submits must run its work inline instead)."""
        return threading.current_thread() is self._thread

    def _queue(self, task: _Task) -> Future[Any]:
        with self._cond:
            self._incoming.append(task)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nabla-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return task.future

    # --- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)  # why: grad mode is per thread; DTO enables it where it needs it
        live: list[_Task] = []
        while True:
            with self._cond:
                if not self._incoming and not live:
                    self._cond.wait(IDLE_EXIT_S)
                    if not self._incoming:
                        self._thread = None
                        return
                if not live:
                    self._gather()
                incoming, self._incoming = self._incoming, []
            with self.lock:
                for task in incoming:
                    if task.function is not None:
                        self._settle(task, task.function)
                    else:
                        self._advance(task, None, live)
                for task in [t for t in live if t.gone()]:
                    self._drop(task, live)
                self._batch(live)

    def _gather(self) -> None:
        """Wait (holding the condition) while jobs keep arriving within :data:`ARRIVAL_WINDOW_S`, up to :data:`ARRIVAL_CAP_S`."""
        deadline = time.monotonic() + ARRIVAL_CAP_S
        while True:
            seen = len(self._incoming)
            self._cond.wait(min(ARRIVAL_WINDOW_S, max(deadline - time.monotonic(), 0.0)))
            if len(self._incoming) == seen or time.monotonic() >= deadline:
                return

    def _batch(self, live: list[_Task]) -> None:
        """One rollout per sampling setting over the rows of every waiting task, then advance those tasks."""
        groups: dict[tuple[float, float, int, bool], list[_Task]] = {}
        for task in live:
            assert task.call is not None
            s = task.call.sampling
            groups.setdefault((s.temperature, s.top_p, s.top_k, task.call.keep_logits), []).append(task)
        for tasks in groups.values():
            calls = [t.call for t in tasks if t.call is not None]
            owner = [i for i, c in enumerate(calls) for _ in c.rows]
            offset = list(itertools.accumulate((len(c.rows) for c in calls), initial=0))
            rows = [row for c in calls for row in c.rows]

            def on_token(b: int, token: int) -> None:
                self.stats.tokens += 1
                task, call = tasks[owner[b]], calls[owner[b]]
                if call.on_token is not None and task.error is None:
                    try:
                        call.on_token(b - offset[owner[b]], token)
                    except Exception as err:  # the caller's callback failed: that task fails, the batch goes on
                        task.error = err

            self.stats.batches += 1
            self.stats.rows += len(rows)
            self.stats.max_rows = max(self.stats.max_rows, len(rows))
            self.stats.sizes = [*self.stats.sizes[-999:], len(tasks)]
            try:
                results = rollout(self.policy, rows, calls[0].sampling, calls[0].keep_logits, on_token, lambda b: not tasks[owner[b]].gone())
            except BaseException as err:  # the batch failed: every task in it fails with it
                for task in tasks:
                    self._finish(task, live, error=err)
                continue
            for i, task in enumerate(tasks):
                if task.gone():
                    self._drop(task, live)
                else:
                    self._advance(task, results[offset[i] : offset[i + 1]], live)

    def _advance(self, task: _Task, rollouts: list[Rollout] | None, live: list[_Task]) -> None:
        """Send the task its rollouts (None: start it) and keep it live until it returns or raises."""
        assert task.job is not None
        if task.future.cancelled():
            self._drop(task, live)
            return
        try:
            task.call = task.job.send(rollouts)  # type: ignore[arg-type]  # why: a generator starts on None
        except StopIteration as done:
            self._finish(task, live, value=done.value)
        except BaseException as err:
            self._finish(task, live, error=err)
        else:
            if task not in live:
                live.append(task)

    def _settle(self, task: _Task, function: Callable[[], Any]) -> None:
        try:
            value = function()
        except BaseException as err:
            self._finish(task, [], error=err)
        else:
            self._finish(task, [], value=value)

    def _finish(self, task: _Task, live: list[_Task], value: Any = None, error: BaseException | None = None) -> None:
        if task in live:
            live.remove(task)
        self.stats.jobs += 1
        error = error or task.error
        try:
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(value)
        except InvalidStateError:  # cancelled by its caller meanwhile: nobody waits for it
            pass

    def _drop(self, task: _Task, live: list[_Task]) -> None:
        """A cancelled task (or one whose callback failed) leaves: its job is closed, its future settled."""
        if task.job is not None:
            task.job.close()
        if task.future.cancelled():
            self.stats.cancelled += 1
            if task in live:
                live.remove(task)
            self.stats.jobs += 1
        else:
            self._finish(task, live)
