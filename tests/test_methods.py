"""The method registry: a new method is one module plus one registry entry, and every consumer picks it up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from nabla_lc import ConfigError, Engine, NablaConfig
from nabla_lc.cli import main
from nabla_lc.methods import MethodSpec, get_method, method_names, register, unregister
from nabla_lc.strategies import BUILT_IN
from nabla_lc.strategies.sampling import draw_and_select

from .tiny import make_policy


def shortest(answers: Sequence[str | None], rewards: Sequence[float] | None) -> int:
    """The sample with the shortest answer (a throwaway chooser)."""
    return min(range(len(answers)), key=lambda j: len(answers[j] or ""))


@pytest.fixture
def throwaway() -> Iterator[MethodSpec]:
    spec = register(MethodSpec("shortest", draw_and_select, needs_reward=False, chooser=shortest))
    yield spec
    unregister(spec.name)


def test_built_in_methods_are_registered_once_in_order() -> None:
    assert method_names()[: len(BUILT_IN)] == ("greedy", "bon", "sc", "weighted_bon", "nabla", "pf", "beam")
    assert [get_method(s.name) for s in BUILT_IN] == list(BUILT_IN)
    with pytest.raises(ValueError, match="already registered"):
        register(BUILT_IN[0])
    with pytest.raises(ConfigError, match="NablaConfig.method"):
        NablaConfig(method="shortest")


def test_a_registered_method_runs_through_generate(throwaway: MethodSpec, tokenizer) -> None:
    engine = Engine(make_policy(tokenizer), tokenizer, None, NablaConfig(max_new_tokens=8, temperature=1.0))
    extract = lambda text: text.strip() or None
    requests = [engine.request(p, seed=1) for p in ("What is 2 + 3?", "Add 7 and 8.")]
    results = engine.generate(requests, engine.config.replace(method="shortest", n=3), extract_answer=extract)
    for result in results:
        answers = [s["answer"] for s in result.samples]
        assert len(answers) == 3 and result.answer == answers[shortest(answers, None)]
        assert result.stats.rollouts == 3 and result.stats.reward_forward == 0
    # Engine.select serves it from a sample set, as it serves the built-in choosers
    sets = engine.sample(requests, engine.config.replace(method="shortest", n=3), scored=False, extract_answer=extract)
    chosen = [engine.select(s, engine.config.replace(method="shortest", n=3), extract) for s in sets]
    assert [r.text for r in chosen] == [r.text for r in results]


def test_a_registered_method_runs_through_the_bench_command(throwaway: MethodSpec, tokenizer, tmp_path: Path) -> None:
    make_policy(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "final_answer": str(a + 1)}) + "\n" for a in range(2)))
    out = tmp_path / "out"
    code = main(["bench", "--data", str(data), "--methods", "shortest,greedy", "--n", "1,2", "--policy", str(tmp_path / "policy"),
                 "--reward", "none", "--device", "cpu", "--set", "max_new_tokens=6", "--out", str(out)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({(r["method"], r["n"]) for r in rows}) == [("greedy", 1), ("shortest", 1), ("shortest", 2)]
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert [(g["method"], g["n"], g["count"]) for g in groups] == [("shortest", 1, 2), ("shortest", 2, 2), ("greedy", 1, 2)]
