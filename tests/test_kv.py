"""The KV module (nabla_lc.kv): each cache operation gives the same next-token logits as a fresh encoding, and no
other module touches a cache's internals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from nabla_lc import kv

from .test_layering import ROOT, modules
from .tiny import make_policy

INTERNALS = {"layers", "batch_select_indices", "key_cache", "value_cache", "crop", "reorder_cache", "get_seq_length", "get_mask_sizes"}
"""Cache attributes only nabla_lc.kv may name."""
CACHE_TYPES = {"DynamicCache", "DynamicLayer", "StaticCache", "QuantizedCache"}
"""transformers' cache classes, named (imported or used) only in nabla_lc.kv."""


def touches(source: str) -> list[str]:
    """Where ``source`` names a cache's internals: a cache class or ``transformers.cache_utils``, an attribute of
    :data:`INTERNALS`, an assignment to ``.keys`` / ``.values``, or ``.keys`` read without a call."""
    tree = ast.parse(source)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "cache_utils" in node.module:
            found.append(f"{node.lineno}: imports {node.module}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [f"{node.lineno}: imports {a.name}" for a in node.names if a.name.rpartition(".")[2] in CACHE_TYPES]
        elif isinstance(node, ast.Name) and node.id in CACHE_TYPES:
            found.append(f"{node.lineno}: names {node.id}")
        elif isinstance(node, ast.Attribute):
            stored = isinstance(node.ctx, ast.Store) and node.attr in ("keys", "values")
            if node.attr in INTERNALS or node.attr in CACHE_TYPES or stored or (node.attr == "keys" and id(node) not in called):
                found.append(f"{node.lineno}: .{node.attr}")
    return found


def test_no_module_outside_kv_touches_cache_internals():
    sources = {name: path for name, path in modules().items() if name != "nabla_lc.kv"}
    sources.update({f"docs/{p.name}": p for p in (ROOT / "docs").glob("*.py")})
    assert "nabla_lc.engine.rollout" in sources and "nabla_lc.rewards.transformer" in sources
    problems = {name: found for name, path in sources.items() if (found := touches(Path(path).read_text()))}
    assert problems == {}
    assert touches((ROOT / "nabla_lc" / "kv.py").read_text())  # the check sees the module that does


@pytest.mark.parametrize(
    "source",
    [
        "from transformers import DynamicCache\n",
        "from transformers.cache_utils import DynamicLayer\n",
        "import transformers\nc = transformers.DynamicCache()\n",
        "for layer in cache.layers:\n    pass\n",
        "cache.batch_select_indices(i)\n",
        "layer.values = v\n",
        "k = layer.keys[:, :, :3]\n",
    ],
)
def test_the_check_sees_each_kind_of_touch(source):
    assert len(touches(source)) == 1


def test_the_check_allows_ordinary_keys_and_values():
    assert touches("d.keys()\nx = scores.values\ntop = t.topk(2).values\nfrom nabla_lc import kv\nc = kv.empty()\n") == []


# --- exactness: each operation against a fresh encoding ------------------------------------------------------

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
NEXT = [20, 21, 22]


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_policy(tokenizer, arch="qwen2")


def fresh(model, ids: list[int]) -> torch.Tensor:
    """[V] next-token logits of ``ids`` encoded in one pass, without a cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def encode(model, rows: list[list[int]]) -> tuple[kv.Cache, torch.Tensor]:
    """A cache of ``rows`` left-padded into one batch, and its [B, L] mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = kv.empty()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache, use_cache=True)
    return cache, mask


def step(model, cache: kv.Cache, mask: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[B, V] logits of one more token a row, after ``cache`` (rows at the positions their masks count)."""
    positions = mask.sum(-1, keepdim=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens)[:, None], attention_mask=torch.cat([mask, mask.new_ones(len(tokens), 1)], 1), position_ids=positions, cache=cache, use_cache=True)
    return out.logits[:, -1]


def assert_fresh(logits: torch.Tensor, rows: list[list[int]], tokens: list[int], model) -> None:
    for got, row, token in zip(logits, rows, tokens):
        torch.testing.assert_close(got, fresh(model, row + [token]), rtol=0, atol=1e-5)


def test_a_filled_cache_continues_like_a_fresh_encoding(model):
    cache, mask = encode(model, ROWS)
    assert_fresh(step(model, cache, mask, NEXT), ROWS, NEXT, model)
    assert [s[2] for s in kv.shapes(cache)] == [len(ROWS[0]) + 1] * 2


def test_head_keeps_the_first_columns_and_leaves_the_cache_alone(model):
    cache, _ = encode(model, [ROWS[0]])
    before = kv.Snapshot.take(cache).tensors
    short = kv.head(cache, 4)
    assert_fresh(step(model, short, torch.ones(1, 4, dtype=torch.long), [NEXT[0]]), [ROWS[0][:4]], NEXT[:1], model)
    assert all(a is b and c is d for (a, c), (b, d) in zip(kv.Snapshot.take(cache).tensors, before))  # not touched


def test_copy_row_takes_a_rows_real_columns(model):
    cache, _ = encode(model, ROWS)
    for row in range(len(ROWS)):
        one = kv.copy_row(cache, row, len(ROWS[row]))
        assert kv.shapes(one)[0][:3] == (1, kv.shapes(cache)[0][1], len(ROWS[row]))
        assert_fresh(step(model, one, torch.ones(1, len(ROWS[row]), dtype=torch.long), [NEXT[row]]), [ROWS[row]], [NEXT[row]], model)


def test_select_rows_keeps_those_rows_in_that_order(model):
    cache, mask = encode(model, ROWS)
    index = torch.tensor([2, 0])
    kv.select_rows(cache, index)
    rows = [ROWS[2], ROWS[0]]
    assert_fresh(step(model, cache, mask[index], [NEXT[2], NEXT[0]]), rows, [NEXT[2], NEXT[0]], model)


def test_trim_left_drops_padding_columns(model):
    cache, mask = encode(model, ROWS[1:])  # widths 3 and 5: two padding columns in row 0
    kv.select_rows(cache, torch.tensor([0]))
    kv.trim_left(cache, 2)
    assert kv.shapes(cache)[0][2] == 3
    assert_fresh(step(model, cache, mask[:1, 2:], [NEXT[1]]), [ROWS[1]], [NEXT[1]], model)


def test_merge_rows_appends_rows_left_padded(model):
    for first, second in ((ROWS[:1], ROWS[1:]), (ROWS[1:2], [ROWS[0], ROWS[2]])):  # the longer side first, then second
        cache, mask = encode(model, first)
        new, new_mask = encode(model, second)
        kv.merge_rows(cache, new)
        width = max(mask.shape[1], new_mask.shape[1])
        merged = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (mask, new_mask)])
        rows = first + second
        assert_fresh(step(model, cache, merged, NEXT[: len(rows)]), rows, NEXT[: len(rows)], model)


def test_a_failed_merge_leaves_the_cache_as_it_was(model, monkeypatch):
    cache, mask = encode(model, ROWS[1:2])
    new, _ = encode(model, ROWS[:1])
    before = [(k.clone(), v.clone()) for k, v in kv.Snapshot.take(cache).tensors]
    calls, original = [0], kv.cat_left_padded

    def broken(old, new):  # fail at the second layer's keys
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected")
        return original(old, new)

    monkeypatch.setattr(kv, "cat_left_padded", broken)
    with pytest.raises(RuntimeError, match="injected"):
        kv.merge_rows(cache, new)
    monkeypatch.undo()
    after = kv.Snapshot.take(cache).tensors
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(after, before))
    assert_fresh(step(model, cache, mask, [NEXT[1]]), ROWS[1:2], NEXT[1:2], model)


def test_a_restored_snapshot_drops_what_later_passes_appended(model):
    cache, mask = encode(model, [ROWS[0]])
    snapshot = kv.Snapshot.take(cache)
    assert snapshot.columns == len(ROWS[0])
    step(model, cache, mask, [NEXT[1]])  # appends a column for another token
    snapshot.restore()
    assert_fresh(step(model, cache, mask, [NEXT[0]]), [ROWS[0]], NEXT[:1], model)


def test_stack_left_pads_one_row_snapshots_into_a_batch(model):
    snapshots = [kv.Snapshot.take(encode(model, [row])[0]) for row in ROWS]
    cache, mask = kv.stack(snapshots)
    assert mask.tolist() == encode(model, ROWS)[1].tolist()
    assert_fresh(step(model, cache, mask, NEXT), ROWS, NEXT, model)
    for snapshot, row in zip(snapshots, ROWS):  # their own caches are not touched
        assert snapshot.columns == len(row) and kv.shapes(snapshot.cache)[0][2] == len(row)
