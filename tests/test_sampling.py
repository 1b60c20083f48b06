"""Token sampling on the logits' device: the same draws as ``torch.multinomial`` per row on CPU, and no per-row copy
to the host."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from nabla_lc.engine import rollout as rollout_module
from nabla_lc.engine.rollout import RolloutBatch, Sampling, filter_logits, keyed_generator, sample

SETTINGS = [Sampling(1.0), Sampling(0.7), Sampling(1.0, top_p=0.9), Sampling(1.3, top_k=20), Sampling(0.8, top_p=0.95, top_k=50)]


def reference(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator | None]) -> list[int]:
    """Yesterday's draw: ``torch.multinomial`` on each row's probabilities on the host."""
    probs = filter_logits(logits.float() / sampling.temperature, sampling.top_p, sampling.top_k).softmax(-1)
    return [int(torch.multinomial(probs[b].cpu(), 1, generator=generators[b])) for b in range(probs.shape[0])]


@pytest.mark.parametrize("sampling", SETTINGS)
def test_each_row_draws_what_multinomial_drew_from_the_same_generator(sampling):
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        vocab = (7, 300, 2000)[trial % 3]
        logits = torch.randn(4, vocab, generator=g) * torch.tensor([[0.1], [1.0], [5.0], [30.0]])  # flat to peaked rows
        if trial % 2:
            logits[:, : vocab // 2] = torch.finfo(torch.float32).min  # a grammar's mask: half the tokens ruled out
        keys = [f"{trial}:{b}" for b in range(4)]
        ours, theirs = [keyed_generator(k) for k in keys], [keyed_generator(k) for k in keys]
        for _ in range(3):  # several draws from each generator: its stream advances alike
            assert sample(logits, sampling, ours).tolist() == reference(logits, sampling, theirs)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs))


def test_rows_without_a_generator_draw_from_the_global_one_as_before():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ours = [sample(logits, Sampling(1.0), [None, None, None]).tolist() for _ in range(4)]
    torch.manual_seed(7)
    theirs = [reference(logits, Sampling(1.0), [None, None, None]) for _ in range(4)]
    assert ours == theirs


def test_invalid_probabilities_fail_as_multinomial_does():
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan` or element < 0"):
        sample(logits, Sampling(1.0), [None, None])


def test_a_greedy_row_takes_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    assert sample(logits, Sampling(0.0), [None] * 3).tolist() == logits.argmax(-1).tolist()


HOST_COPIES = {"cpu", "item", "tolist", "numpy"}
"""Tensor methods that copy to the host (a device sync)."""


def per_row_host_copies(function) -> list[str]:
    """Host copies in ``function``'s source: any ``.cpu()``, and inside a loop or comprehension any of
    :data:`HOST_COPIES` or ``int()`` / ``float()`` / ``bool()`` (each one a sync a row)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = [f"{n.lineno}: .cpu()" for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "cpu"]
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp))]
    for loop in loops:
        for n in ast.walk(loop):
            if not isinstance(n, ast.Call):
                continue
            method = isinstance(n.func, ast.Attribute) and n.func.attr in HOST_COPIES - {"cpu"}
            builtin = isinstance(n.func, ast.Name) and n.func.id in ("int", "float", "bool")
            if method or builtin:
                found.append(f"{n.lineno}: {ast.unparse(n)}")
    return found


@pytest.mark.parametrize(
    "function",
    [sample, filter_logits, rollout_module._outside_nucleus, rollout_module._outside_nucleus_of_candidates, rollout_module._masked_rows, RolloutBatch._decode, RolloutBatch._prefill],
)
def test_sampling_copies_nothing_to_the_host_per_row(function):
    assert per_row_host_copies(function) == []


def test_the_check_sees_a_per_row_host_copy():
    def old(probs, generators):
        out = [torch.multinomial(probs[b].cpu(), 1, generator=generators[b]) for b in range(probs.shape[0])]
        return [int(t) for t in out]

    assert len(per_row_host_copies(old)) == 2
