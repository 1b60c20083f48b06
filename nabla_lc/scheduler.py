"""Continuous batching: one thread owns the models and samples the rollouts of every job in flight together.

Every submitted job (a method's batch of requests, a sample set) is a :data:`~nabla_lc.engine.calls.Job`: it
runs its own work (gates, DTO steps) until it needs rollouts, DTO passes or scorings of complete responses, then
waits. The scheduler keeps one running :class:`~nabla_lc.engine.rollout.RolloutBatch` per sampling setting and loops:
admit new jobs, drop cancelled ones, run the DTO passes every waiting job asks for in one batched pass and their
scorings in another (again, until every job waits on rollouts; while rows decode, a pass or scoring waits a few steps
for others to join it: :data:`PASS_WAIT_STEPS`), join the rows of every job that waits to its batch in one call (at a
token boundary: their prefixes are encoded in one pass and their KV cache merged in), then sample one token for every
row of every batch. A row that finishes goes back to its job at
once, which runs on until it needs rollouts again; a cancelled job's rows leave at the next token. Each row keeps its own seeded generator, so a
job's outcome does not depend on what else is in flight. Jobs that are not generators (a method registered without
``steps``, :meth:`Scheduler.call`) run alone between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch

from .engine.calls import Call, CallCounts, Executor, Job, Kind, RolloutCall, checked
from .engine.policy import Policy
from .engine.rollout import Rollout, RolloutBatch

log = logging.getLogger(__name__)

T = TypeVar("T")

ARRIVAL_WINDOW_S = 0.01
"""When the scheduler is idle and a job arrives, it waits this long for others (again after each arrival, at most
:data:`ARRIVAL_CAP_S` in all) before starting, so that requests sent together start in one batch. A job that arrives
while others run joins them at the next boundary without waiting."""
ARRIVAL_CAP_S = 0.05

PASS_WAIT_STEPS = 8
"""While rows are decoding (or are about to: a job waits on rollouts), a job's DTO pass waits (its job does not go
on) until half of the jobs in flight that yield DTO passes (∇ jobs; see :meth:`Scheduler.submit`) wait on passes too,
or until it has waited this many decoding steps, so that passes run in larger batches; so does a scoring, for
scorings. A pass with no other such job in flight runs at once."""

TOGETHER: tuple[Kind, ...] = ("pass", "score")
"""The calls whose requests, from every job that waits on one, run together (DTO passes, then scorings)."""

IDLE_EXIT_S = 2.0
"""Seconds the scheduler thread waits for work before it exits (the next submit starts another), so that an
engine nobody uses holds no thread and can be garbage-collected."""


@dataclass(eq=False)
class _Task:
    """A submitted job (or a plain function) and the future of its outcome."""

    future: Future[Any]
    job: Job[Any] | None
    function: Callable[[], Any] | None = None
    call: Call | None = None
    """The rollouts (or DTO passes, or scorings) it waits on."""
    placed: bool = False
    """Whether the call's rows joined a batch."""
    since: int = 0
    """The scheduler's step count when the call was made."""
    got: list[Rollout | None] = field(default_factory=list)
    """The call's rollouts, as its rows finish."""
    waiting: int = 0
    """Rows of the call not finished yet."""
    error: BaseException | None = None
    """Raised by its ``on_token`` during a step; the task fails at the next boundary."""
    passes: bool = False
    """Whether the job yields DTO passes or scorings (declared at submit, or seen): only such jobs hold a pass back."""

    def gone(self) -> bool:
        return self.future.cancelled() or self.error is not None

    def waits_on(self, kind: Kind) -> bool:
        """Whether its call is of ``kind`` (rollouts, DTO passes or scorings)."""
        return self.call is not None and self.call.kind == kind


class _Group:
    """The running batch of one sampling setting, and which task's call each of its rows belongs to."""

    def __init__(self, policy: Policy, call: RolloutCall, stats: "SchedulerStats", prefill_chunk: int | None) -> None:
        self.owners: dict[int, tuple[_Task, int]] = {}
        self.stats = stats
        self.batch = RolloutBatch(policy, call.sampling, call.keep_logits, self.on_token, self.keep_going, prefill_chunk)

    def on_token(self, b: int, token: int) -> None:
        self.stats.tokens += 1
        task, j = self.owners[b]
        assert isinstance(task.call, RolloutCall)
        if task.call.on_token is not None and task.error is None:
            try:
                task.call.on_token(j, token)
            except Exception as err:  # the caller's callback failed: that task fails, the batch goes on
                task.error = err

    def keep_going(self, b: int) -> bool:
        return not self.owners[b][0].gone()


@dataclass
class SchedulerStats(CallCounts):
    """What the scheduler did, for tests and metrics (and, as :class:`~nabla_lc.engine.calls.CallCounts`, the batched
    DTO passes and scorings its executor ran)."""

    steps: int = 0
    """Batched decoding steps (one policy pass over every active row of a batch)."""
    row_steps: int = 0
    """Active rows summed over the steps."""
    rows: int = 0
    """Rows that joined a batch."""
    tokens: int = 0
    """Tokens sampled."""
    jobs: int = 0
    """Jobs and functions finished (with a result, an error or cancelled)."""
    cancelled: int = 0
    """Jobs dropped because their future was cancelled."""
    max_rows: int = 0
    """Most rows in one step."""
    sizes: list[int] = field(default_factory=list)
    """Jobs with rows in each step, the last 1000."""


class Scheduler:
    """Runs jobs on one thread, batching their rollouts. ``lock`` is held while the models are in use, so other
    code that uses them directly (``nabla_lc.diagnose``) excludes the scheduler by holding it too."""

    def __init__(self, policy: Policy, lock: threading.RLock, prefill_chunk: int | None = None) -> None:
        self.policy = policy
        self.lock = lock
        self.prefill_chunk = prefill_chunk
        """Prefill a prefix longer than this many tokens a chunk a step, between the other rows' tokens (None: at once;
        :class:`~nabla_lc.engine.rollout.RolloutBatch`); a batch started later picks up a change."""
        self.stats = SchedulerStats()
        self.executor = Executor(policy, self.stats)
        self._cond = threading.Condition()
        self._incoming: list[_Task] = []
        self._thread: threading.Thread | None = None

    # --- callers --------------------------------------------------------------------------
    def submit(self, job: Job[T], passes: bool = False) -> Future[T]:
        """Queue ``job``; its future holds what it returns. Cancelling the future stops it at the next token.

        ``passes``: the job yields DTO passes (:class:`~nabla_lc.engine.calls.PassCall`), so another job's pass waits for
        it to join (:data:`PASS_WAIT_STEPS`); a job not declared so counts once it yields one."""
        return self._queue(_Task(Future(), job, passes=passes))

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
        groups: dict[tuple[float, float, int, bool], _Group] = {}
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
                self._run_passes(live, groups)
                self._place([t for t in live if t.waits_on("rollout") and not t.placed], groups, live)
                for key, group in list(groups.items()):
                    if group.batch.busy:
                        self._step(group, live)
                    if not group.batch.busy:
                        del groups[key]

    def _gather(self) -> None:
        """Wait (holding the condition) while jobs keep arriving within :data:`ARRIVAL_WINDOW_S`, up to :data:`ARRIVAL_CAP_S`."""
        deadline = time.monotonic() + ARRIVAL_CAP_S
        while True:
            seen = len(self._incoming)
            self._cond.wait(min(ARRIVAL_WINDOW_S, max(deadline - time.monotonic(), 0.0)))
            if len(self._incoming) == seen or time.monotonic() >= deadline:
                return

    def _run_passes(self, live: list[_Task], groups: dict[tuple[float, float, int, bool], _Group]) -> None:
        """Run the DTO passes of every job that waits on some in one batch, and the scorings in another, again until
        none does, or, while rows are decoding or about to, until too few do (:data:`PASS_WAIT_STEPS`). A batch that
        raises runs again job by job, so that only a job whose own calls fail fails."""
        while True:
            ran = False
            for kind in TOGETHER:
                waiting = [t for t in live if t.waits_on(kind)]
                if not waiting:
                    continue
                oldest = min(t.since for t in waiting)
                decoding = any(g.batch.busy for g in groups.values()) or any(t.waits_on("rollout") for t in live)
                capable = sum(t.passes for t in live)  # why: a job that never yields passes cannot join the batch
                if decoding and 2 * len(waiting) < capable and self.stats.steps - oldest < PASS_WAIT_STEPS:
                    continue
                self._run_batch(waiting, live)
                ran = True
            if not ran:
                return

    def _run_batch(self, tasks: list[_Task], live: list[_Task]) -> None:
        """Run the calls of ``tasks`` (all DTO passes or all scorings) in one batch and send each task its part; if
        that raises, each task's calls run again by themselves."""
        try:
            found = self.executor.run_together([t.call for t in tasks])  # type: ignore[misc]  # why: all passes or all scorings
        except Exception as err:  # why: one request's failure must not fail the others: each job's calls run again alone
            if len(tasks) == 1:
                self._finish(tasks[0], live, error=err)
                return
            log.debug("a batched DTO pass or scoring failed; running each job's alone", exc_info=True)
            for task in tasks:
                self._run_batch([task], live)
            return
        except BaseException as err:  # not an error of a request (an interrupt): every task in the batch fails with it
            for task in tasks:
                self._finish(task, live, error=err)
            return
        for task, results in zip(tasks, found):
            self._advance(task, results, live)

    def _place(self, tasks: list[_Task], groups: dict[tuple[float, float, int, bool], _Group], live: list[_Task]) -> None:
        """Join the tasks' calls to the running batch of their sampling setting, the rows of all the tasks of one
        setting in one :meth:`~nabla_lc.engine.rollout.RolloutBatch.add` (their prefixes encoded in one pass). If
        that raises, each task joins alone, so that only a task whose own rows fail fails."""
        by_key: dict[Any, list[_Task]] = {}
        for task in tasks:
            call = task.call
            assert isinstance(call, RolloutCall)
            task.placed, task.got, task.waiting = True, [None] * len(call.rows), len(call.rows)
            if not call.rows:
                self._advance(task, [], live)
                continue
            by_key.setdefault((call.sampling, call.keep_logits), []).append(task)  # why: the whole Sampling, so a field added to it splits batches too
        for key, joining in by_key.items():
            if key not in groups:
                groups[key] = _Group(self.policy, joining[0].call, self.stats, self.prefill_chunk)  # type: ignore[arg-type]
            error = self._join(groups[key], joining, live)
            if error is None:
                continue
            if len(joining) > 1 and isinstance(error, Exception):
                log.debug("a batched join failed; joining each task's rows alone", exc_info=error)
                for task in joining:
                    own = self._join(groups[key], [task], live)
                    if own is not None:
                        self._finish(task, live, error=own)
            else:  # one task's own rows failed, or an interrupt: every task in the join fails with it
                for task in joining:
                    self._finish(task, live, error=error)

    def _join(self, group: _Group, tasks: list[_Task], live: list[_Task]) -> BaseException | None:
        """Add the rows of ``tasks`` to ``group``'s batch in one call; what it raised, if it did (the batch is then as
        it was)."""
        first = group.batch.count
        rows = []
        for task in tasks:
            call = task.call
            assert isinstance(call, RolloutCall)
            for j in range(len(call.rows)):
                group.owners[first + len(rows) + j] = (task, j)
            rows.extend(call.rows)
        try:
            done = group.batch.add(rows)
        except BaseException as err:
            for b in range(first, first + len(rows)):
                group.owners.pop(b, None)
            return err
        self.stats.rows += len(rows)
        self._deliver(group, done, live)
        return None

    def _step(self, group: _Group, live: list[_Task]) -> None:
        """One token for every row of the batch; finished rows go to their tasks, and a row whose own work failed (its
        grammar) fails only its task."""
        active = group.batch.active
        if active:  # why: a step that only prefills decodes no row: it is no decoding step (PASS_WAIT_STEPS, sizes)
            self.stats.steps += 1
            self.stats.row_steps += len(active)
            self.stats.max_rows = max(self.stats.max_rows, len(active))
            self.stats.sizes = [*self.stats.sizes[-999:], len({id(group.owners[b][0]) for b in active})]
        try:
            done = group.batch.step()
        except BaseException as err:  # the batch's own work failed (the policy's pass): every task in it fails with it
            for task in {id(t): t for t, _ in group.owners.values()}.values():
                self._finish(task, live, error=err)
            group.owners.clear()
            group.batch.active, group.batch.prefilling = [], []
            return
        self._deliver(group, done, live)

    def _deliver(self, group: _Group, done: Sequence[tuple[int, Rollout | Exception]], live: list[_Task]) -> None:
        for b, result in done:
            task, j = group.owners.pop(b)
            if task not in live:  # dropped meanwhile
                continue
            if isinstance(result, Exception) and task.error is None:  # the row failed: its task fails, its other rows leave
                task.error = result
            if task.gone():
                self._drop(task, live)
                continue
            task.got[j] = result
            task.waiting -= 1
            if task.waiting == 0:
                self._advance(task, list(task.got), live)  # type: ignore[arg-type]

    def _advance(self, task: _Task, rollouts: list[Rollout] | None, live: list[_Task]) -> None:
        """Send the task its rollouts (None: start it) and keep it live until it returns or raises."""
        assert task.job is not None
        if task.future.cancelled():
            self._drop(task, live)
            return
        try:
            task.call = checked(task.job.send(rollouts))  # type: ignore[arg-type]  # why: a generator starts on None
        except StopIteration as done:
            self._finish(task, live, value=done.value)
        except BaseException as err:
            self._finish(task, live, error=err)
        else:
            task.placed, task.since = False, self.stats.steps
            task.passes = task.passes or task.call.kind != "rollout"
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
        """A cancelled task (or one whose callback failed) leaves: its job is closed, its future settled. Its rows
        still in a batch leave at that batch's next step (``keep_going``)."""
        if task.job is not None:
            task.job.close()
        if task.future.cancelled():
            self.stats.cancelled += 1
            if task in live:
                live.remove(task)
            self.stats.jobs += 1
        else:
            self._finish(task, live)
