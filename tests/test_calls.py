"""The one call protocol (nabla_lc.engine.calls): decodings' requests gathered into calls, one executor that runs
them alone or together and counts them, and no other module that tells the kinds apart."""

from __future__ import annotations

import ast
import threading

import pytest
import torch

from nabla_lc import Stats, scheduler
from nabla_lc.engine.calls import Executor, PassCall, RolloutCall, ScoreCall, gather, run_alone
from nabla_lc.engine.dto import NonFiniteGradient, PassRequest
from nabla_lc.engine.policy import Policy
from nabla_lc.engine.rollout import RolloutRow, Sampling
from nabla_lc.engine.scoring import ScoreRequest, run_scores

from .test_layering import modules
from .tiny import LinearReward, make_policy

KINDS = {"RolloutCall", "PassCall", "ScoreCall", "RolloutRow", "PassRequest", "ScoreRequest"}
"""The calls and the requests of the protocol."""


def dispatches(source: str) -> list[str]:
    """``isinstance`` tests against :data:`KINDS` in ``source``, other than an ``assert``'s (which only narrows a type)."""
    tree = ast.parse(source)
    asserted = {id(n) for a in ast.walk(tree) if isinstance(a, ast.Assert) for n in ast.walk(a)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and id(node) not in asserted:
            names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1]) if isinstance(n, (ast.Name, ast.Attribute))}
            if names & KINDS:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_calls_module_tells_the_kinds_apart():
    found = {name: d for name, path in modules().items() if name != "nabla_lc.engine.calls" and (d := dispatches(path.read_text()))}
    assert found == {}


def test_the_check_sees_a_dispatch_but_not_a_narrowing_assert():
    assert len(dispatches("if isinstance(call, PassCall):\n    pass\n")) == 1
    assert len(dispatches("x = [c for c in calls if isinstance(c, (calls.ScoreCall, int))]\n")) == 1
    assert dispatches("assert isinstance(call, RolloutCall)\nisinstance(x, int)\n") == []


@pytest.fixture(scope="module")
def policy(tokenizer) -> Policy:
    return Policy(make_policy(tokenizer), tokenizer)


def test_scorings_of_several_calls_run_in_one_batch_split_back_and_counted(policy):
    reward = LinearReward(policy.vocab_size)
    requests = [ScoreRequest(reward, "q", [[5, 6], [7]], Stats()), ScoreRequest(reward, "r", [[8]], Stats()), ScoreRequest(reward, "s", [[9, 10, 11]], Stats())]
    executor = Executor(policy)
    found = executor.run_together([ScoreCall(requests[:1]), ScoreCall(requests[1:])])
    assert found == [run_scores(requests[:1]), run_scores(requests[1:])]
    assert [len(f) for f in found] == [1, 2] and len(found[0][0]) == 2
    assert (executor.counts.scorings, executor.counts.scoring_rows, executor.counts.passes) == (1, 3, 0)


def test_gather_runs_passes_then_scorings_then_rollouts_and_sends_each_its_own(policy):
    # three decodings: one asks for a pass, one for a scoring, one for two rollouts; then each for one rollout
    reward = LinearReward(policy.vocab_size)
    row = lambda: RolloutRow([5, 6], [], 3, (), None, Stats())
    got: dict[str, list[object]] = {"a": [], "b": [], "c": []}
    pass_request, score_request = PassRequest(None, torch.zeros(1)), ScoreRequest(reward, "q", [[5]], Stats())  # type: ignore[arg-type]

    def decoding(name: str, first: object):
        got[name].append((yield first))
        got[name].append((yield [row()]))
        return name

    job = gather([decoding("a", pass_request), decoding("b", score_request), decoding("c", [row(), row()])], Sampling(1.0))
    call = next(job)
    assert isinstance(call, PassCall) and call.requests == [pass_request]
    call = job.send(["pass-a"])
    assert isinstance(call, ScoreCall) and call.requests == [score_request]
    call = job.send([[0.5]])
    assert isinstance(call, RolloutCall) and len(call.rows) == 4 and call.keep_logits and call.sampling == Sampling(1.0)
    call = job.send(["ra", "rb", "rc1", "rc2"])  # a and b are done; c asks for one more rollout
    assert isinstance(call, RolloutCall) and len(call.rows) == 1
    with pytest.raises(StopIteration) as done:
        job.send(["rc3"])
    assert done.value.value == ["a", "b", "c"]
    assert got == {"a": ["pass-a", ["ra"]], "b": [[0.5], ["rb"]], "c": [["rc1", "rc2"], ["rc3"]]}


def test_a_non_finite_pass_is_thrown_into_its_decoding(policy):
    caught = []

    def decoding():
        try:
            yield PassRequest(None, torch.zeros(1))  # type: ignore[arg-type]
        except NonFiniteGradient as err:
            caught.append(err)
        return "kept going"

    job = gather([decoding()])
    next(job)
    with pytest.raises(StopIteration) as done:
        job.send([NonFiniteGradient("injected")])
    assert done.value.value == ["kept going"] and str(caught[0]) == "injected"


def test_a_decoding_that_yields_no_request_fails_with_a_type_error_naming_what_it_yielded():
    def decoding():
        yield RolloutRow([5, 6], [], 3, (), None, Stats())  # one row, not a list of rows

    with pytest.raises(TypeError, match="a decoding yielded RolloutRow, not a list of RolloutRow"):
        next(gather([decoding()], Sampling(1.0)))


def test_a_job_that_yields_no_call_fails_with_a_type_error_alone_and_in_the_scheduler(policy):
    def job():
        yield RolloutRow([5, 6], [], 3, (), None, Stats())  # a request, not a call

    def fine():
        rollouts = yield RolloutCall([RolloutRow([5, 6], [], 2, (), torch.Generator().manual_seed(0), Stats())], Sampling(1.0))
        return rollouts[0].tokens

    with pytest.raises(TypeError, match="a job yielded RolloutRow, not a RolloutCall"):
        run_alone(policy, job())
    sched = scheduler.Scheduler(policy, threading.RLock())
    bad, good = sched.submit(job()), sched.submit(fine())
    with pytest.raises(TypeError, match="RolloutRow"):
        bad.result(timeout=60)
    assert good.result(timeout=60) == run_alone(policy, fine())  # the scheduler went on
