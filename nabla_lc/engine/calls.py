"""One call protocol: what a decoding asks of the models, and the one executor that runs it.

A decoding (a :class:`~nabla_lc.engine.decoder.Decoder`'s steps, a DTO run's probe or optimization) yields
:data:`Request` values, plain data: :class:`~nabla_lc.engine.rollout.RolloutRow` values to roll out, a
:class:`~nabla_lc.engine.dto.PassRequest` (one DTO pass), a :class:`~nabla_lc.engine.scoring.ScoreRequest` (one
scoring). :func:`gather` runs decodings side by side as a :data:`Job`, which yields :data:`Call` values: the requests
of one kind that its decodings wait on at the same time. The :class:`Executor` runs calls, one alone or the calls of
many jobs in one batch, and counts them; a scheduler decides which calls run together and when. Only this module
dispatches on the call and request classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generator, Literal, Sequence, TypeVar

from .dto import NonFiniteGradient, Pass, PassRequest, run_passes
from .policy import Policy
from .rollout import Rollout, RolloutRow, Sampling, rollout
from .scoring import ScoreRequest, run_scores

T = TypeVar("T")

Kind = Literal["rollout", "pass", "score"]


@dataclass
class RolloutCall:
    """The rollouts a job waits on: its rows, all sampled alike (one :func:`~nabla_lc.engine.rollout.rollout` call's
    arguments); sent back in row order, each a :class:`~nabla_lc.engine.rollout.Rollout`."""

    kind: ClassVar[Kind] = "rollout"
    rows: list[RolloutRow]
    sampling: Sampling
    keep_logits: bool = False
    on_token: Callable[[int, int], None] | None = None
    """``on_token(row, token)``, ``row`` indexing :attr:`rows`."""


@dataclass
class PassCall:
    """The DTO passes a job waits on, one per decoding; sent back in order (a :class:`NonFiniteGradient` in place
    of a pass that was not finite)."""

    kind: ClassVar[Kind] = "pass"
    requests: list[PassRequest]


@dataclass
class ScoreCall:
    """The scorings a job waits on, one per decoding; sent back in order, each a list of floats."""

    kind: ClassVar[Kind] = "score"
    requests: list[ScoreRequest]


Call = RolloutCall | PassCall | ScoreCall
Job = Generator[Call, "list[Any]", T]
"""A decoding in progress (a method's batch, a sample set): yields each :data:`Call` it needs, is sent its results in
order, returns its outcome. A scheduler may run the calls of many jobs in one batch."""

Request = list[RolloutRow] | PassRequest | ScoreRequest
Decoding = Generator[Request, Any, T]
"""One decoding in progress: yields each request it needs (rows to roll out, a DTO pass, a scoring), is sent its
result (their :class:`~nabla_lc.engine.rollout.Rollout` values in row order, a :class:`~nabla_lc.engine.dto.Pass`, a
list of floats; a pass's :class:`NonFiniteGradient` is thrown in), returns its outcome."""


def checked(call: Any) -> Call:
    """``call``, which a job yielded; TypeError if it is not a :data:`Call`."""
    if not isinstance(call, (RolloutCall, PassCall, ScoreCall)):
        raise TypeError(f"a job yielded {type(call).__name__}, not a RolloutCall, PassCall or ScoreCall")
    return call


@dataclass
class CallCounts:
    """The batched calls an executor ran, for tests and metrics."""

    passes: int = 0
    """Batched DTO passes (one :func:`~nabla_lc.engine.dto.run_passes` over the rows of every waiting job: one forward
    and backward pass of each model, several past :data:`~nabla_lc.engine.dto.PASS_ROWS` rows)."""
    pass_rows: int = 0
    """DTO passes (one per decoding) summed over the batched passes."""
    scorings: int = 0
    """Batched scorings of complete responses (one :func:`~nabla_lc.engine.scoring.run_scores` over the scorings of
    every waiting job: one reward pass where the reward batches them)."""
    scoring_rows: int = 0
    """Scorings (one per decoding, each of its responses) summed over the batched scorings."""


class Executor:
    """Runs every model call of the jobs it is given: a call alone (:meth:`run`), the DTO passes or the scorings of
    many jobs in one batch (:meth:`run_together`), a whole job alone (:meth:`drive`); counted in :attr:`counts`.
    Rollouts that rows join while others decode are a scheduler's :class:`~nabla_lc.engine.rollout.RolloutBatch`."""

    def __init__(self, policy: Policy, counts: CallCounts | None = None) -> None:
        self.policy = policy
        self.counts = counts if counts is not None else CallCounts()

    def run_together(self, calls: Sequence[PassCall] | Sequence[ScoreCall]) -> list[list[Any]]:
        """The results of calls of one kind, DTO passes or scorings, all their requests in one batch (each counted in
        its own decoding's stats as if it ran alone), split back per call."""
        requests: list[Any] = [r for call in calls for r in call.requests]
        found: Sequence[Any]
        if isinstance(calls[0], PassCall):
            self.counts.passes += 1
            self.counts.pass_rows += len(requests)
            found = run_passes(requests)
        else:
            self.counts.scorings += 1
            self.counts.scoring_rows += len(requests)
            found = run_scores(requests)
        out, start = [], 0
        for call in calls:
            out.append(list(found[start : start + len(call.requests)]))
            start += len(call.requests)
        return out

    def run(self, call: Call) -> list[Any]:
        """The results of one call, run at once in its own batch."""
        if isinstance(call, RolloutCall):
            return list(rollout(self.policy, call.rows, call.sampling, call.keep_logits, call.on_token))
        return self.run_together([call])[0]  # type: ignore[arg-type]  # why: a list of one call is of one kind

    def drive(self, job: Job[T]) -> T:
        """Drive ``job`` by itself: each call it yields is run at once, in its own batch."""
        try:
            call = checked(next(job))
            while True:
                call = checked(job.send(self.run(call)))
        except StopIteration as done:
            return done.value


def run_alone(policy: Policy, job: Job[T]) -> T:
    """``job`` driven by itself (:meth:`Executor.drive`)."""
    return Executor(policy).drive(job)


def gather(decodings: Sequence[Decoding[T]], sampling: Sampling | None = None) -> Job[list[T]]:
    """Run decodings side by side, as a job: the DTO passes they wait on at the same time form one call, and so do
    the scorings and the rollouts (sampled with ``sampling``, their logits kept).

    Each decoding runs its own positions until it needs a pass, a scoring or a rollout. The waiting passes and
    scorings are run first (each kind together), until every decoding waits on a rollout or is done; then the
    waiting rollouts are sampled together, each row with its own generator and statistics.
    """
    done: dict[int, T] = {}
    waiting: dict[int, Request] = {}

    def advance(i: int, result: list[Rollout] | Pass | list[float] | NonFiniteGradient | None) -> None:
        try:
            if isinstance(result, NonFiniteGradient):
                waiting[i] = decodings[i].throw(result)
            else:
                waiting[i] = decodings[i].send(result)
        except StopIteration as finished:
            done[i] = finished.value

    for i in range(len(decodings)):
        advance(i, None)
    while waiting:
        passes = [(i, w) for i, w in sorted(waiting.items()) if isinstance(w, PassRequest)]
        scorings = [(i, w) for i, w in sorted(waiting.items()) if isinstance(w, ScoreRequest)]
        if passes or scorings:
            ready: Sequence[tuple[int, Request]] = passes or scorings
            for i, _ in ready:
                del waiting[i]
            found = yield PassCall([w for _, w in passes]) if passes else ScoreCall([w for _, w in scorings])
            for (i, _), result in zip(ready, found):
                advance(i, result)
            continue
        other = next((w for w in waiting.values() if not isinstance(w, list)), None)
        if other is not None:
            raise TypeError(f"a decoding yielded {type(other).__name__}, not a list of RolloutRow, a PassRequest or a ScoreRequest")
        calls = [(i, rows) for i, rows in sorted(waiting.items()) if isinstance(rows, list)]  # why: rows in request order, however the passes reordered the waiting
        waiting.clear()
        if sampling is None:
            raise ValueError("a decoding asked for rollouts, but gather() was given no sampling setting")
        rollouts = yield RolloutCall([row for _, rows in calls for row in rows], sampling, keep_logits=True)
        start = 0
        for i, rows in calls:
            advance(i, rollouts[start : start + len(rows)])
            start += len(rows)
    return [done[i] for i in range(len(decodings))]


def decode_alone(policy: Policy, decoding: Decoding[T]) -> T:
    """One decoding (a DTO run's probe or optimization, a :class:`~nabla_lc.engine.decoder.Decoder`'s steps) driven by
    itself."""
    return run_alone(policy, gather([decoding]))[0]
