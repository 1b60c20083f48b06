"""Answer extraction and the two graders, on reference answers from /work/shared/data."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nabla_lc.answers import find_answer
from nabla_lc.bench.grading import Grader, Verdict, combine, extract_answer, normalize_answer

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="the shared benchmark data is not on this machine")


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=20) as g:
        yield g


def reference(file: str, index: int) -> str:
    with (DATA / f"{file}.jsonl").open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == index:
                return json.loads(line)["final_answer"]
    raise IndexError(index)


@pytest.mark.parametrize(
    "text, raw",
    [
        ("so $x = \\boxed{\\dfrac{1}{2}}$.", "\\dfrac{1}{2}"),
        ("first \\boxed{10}, then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)} at last", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed 7$ done", "7"),
        ("\\boxed{5", "5"),  # cut inside the box: the last number
        ("Adding up, the answer is $\\frac{14}{3}$. Then more text", "\\frac{14}{3}"),
        ("The final answer is 18 dollars.", "18 dollars"),
        ("Janet earns 16 - 3 - 4 = 9 eggs.\n#### 2,125", "2,125"),
        ("so 12 apples and 1,234.5 pears", "1234.5"),
        ("she has -3 left", "-3"),
        ("no digits at all", None),
    ],
)
def test_find_answer(text: str, raw: str | None) -> None:
    assert find_answer(text) == raw


@pytest.mark.parametrize(
    "answer, normal",
    [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\dfrac{14}{3}", "\\frac{14}{3}"),
        ("\\text{Evelyn}", "Evelyn"),
        ("90^\\circ", "90"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("5.4 \\text{ cents}", "5.4"),
        ("10\\text{ cm}^2", "10"),
        ("\\$18.90", "18.9"),
        ("x = 5", "5"),
        ("2,125", "2125"),
        ("1,-2", "1,-2"),  # a list, not a thousands separator
        ("1\\!000", "1000"),
        ("3/4", "\\frac{3}{4}"),
    ],
)
def test_normalize_answer(answer: str, normal: str) -> None:
    assert normalize_answer(answer) == normal


def test_extract_answer_normalizes_so_equal_answers_vote_together() -> None:
    assert extract_answer("\\boxed{\\dfrac{1}{2}}") == extract_answer("the answer is \\frac12.") == "\\frac{1}{2}"
    assert extract_answer("nothing") is None


@needs_data
@pytest.mark.parametrize(
    "file, index, answer, correct",
    [
        ("math500_test", 0, "(3, \\frac{\\pi}{2})", True),  # \left( 3, \frac{\pi}{2} \right)
        ("math500_test", 0, "(3,\\pi)", False),
        ("math500_test", 0, "\\left(\\frac{\\pi}{2}, 3\\right)", False),
        ("math500_test", 2, "14/3", True),  # \frac{14}{3}
        ("math500_test", 2, "4.67", False),
        ("math500_test", 4, "Evelyn", True),  # \text{Evelyn}
        ("math500_test", 4, "\\text{Bob}", False),
        ("math500_test", 7, "90", True),  # 90^\circ
        ("math500_test", 7, "45^\\circ", False),
        ("math500_test", 166, "\\frac{270}{7}^\\circ", True),  # \frac{270}7\text{ degrees}
        ("math500_test", 184, "(2, \\infty)", True),  # (2,\infty)
        ("math500_test", 184, "[2,\\infty)", False),
        ("math500_test", 307, "(-\\infty,0)", False),  # (-\infty, 0]
        ("math500_test", 435, "(-\\infty,2)\\cup(3,\\infty)", True),
        ("math500_test", 435, "(-\\infty,3)\\cup(2,\\infty)", False),
        ("math500_test", 227, "C", True),  # \text{(C)}
        ("math500_test", 227, "(B)", False),
        ("math500_test", 301, "5.40 cents", True),  # 5.4 \text{ cents}
        ("math500_test", 8, "\\sqrt{117}", True),  # 3\sqrt{13}
        ("math500_test", 8, "13\\sqrt{3}", False),
        ("math500_test", 1, "q-p", False),  # p - q
        ("gsm8k_dev", 146, "2,125", True),  # 2125
        ("gsm8k_dev", 146, "2,124", False),
        ("gsm8k_dev", 611, "145000", False),  # 1450000
        ("aime24", 0, "0204", True),  # 204
        ("aime24", 0, "240", False),
        ("amc23", 15, "-1", True),  # -1
        ("amc23", 15, "1", False),
    ],
)
def test_grading_real_references(grader: Grader, file: str, index: int, answer: str, correct: bool) -> None:
    verdict = grader.grade(answer, reference(file, index))
    assert verdict == Verdict(correct, correct, correct)


@needs_data
def test_grader_disagreement_is_recorded(grader: Grader) -> None:
    # MATH-500 "1,-2" lists two roots: math-verify compares as a set, the normalising grader in order
    verdict = grader.grade("-2, 1", reference("math500_test", 25))
    assert verdict == Verdict(True, True, False)
    assert verdict.disagree


def test_verdict_rule() -> None:
    assert combine(True, False) == Verdict(True, True, False) and combine(True, False).disagree
    assert combine(None, True).correct and not combine(None, True).disagree  # math-verify could not parse
    assert not combine(None, None).correct
    assert Grader().grade(None, "3") == Verdict(False, False, False)  # nothing extracted: no process started


def test_grading_from_worker_threads(grader: Grader) -> None:
    cases = [("\\frac{1}{2}", "0.5", True), ("2", "3", False)] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        verdicts = list(pool.map(lambda c: (threading.current_thread() is not threading.main_thread(), grader.grade(c[0], c[1])), cases))
    assert all(off_main for off_main, _ in verdicts)
    assert [v.correct for _, v in verdicts] == [c[2] for c in cases]


def test_timeout_kills_the_grading_process_and_recovers() -> None:
    with Grader(timeout_s=1.0) as grader:
        with ThreadPoolExecutor(max_workers=1) as pool:  # off the main thread, where signal.alarm cannot work
            verdict = pool.submit(grader.grade, "9^{9^{9^{9}}}", "1").result()  # math-verify would compute for minutes
        assert verdict.timed_out and not verdict.correct and verdict.math_verify is None
        assert grader.grade("4", "4").correct  # a fresh process took over


def test_normalization_is_linear_on_long_runs() -> None:
    """Once 9 s for a 199-token response, in the main process; 200,000 spaces would have taken about half an hour."""
    import subprocess
    import sys

    from nabla_lc.bench import grading

    inputs = ["'1' + ' ' * N + 'x'", "'12' + ' ' * N + 'cm'", "'1' * N + 'x'", "'1.' + '0' * N + '5'", "'\\\\text{' + ' ' * N + '!'"]
    script = (
        "import runpy, sys; normalize = runpy.run_path(sys.argv[1])['normalize_answer']; N = 200_000; "  # the file alone: no torch
        f"print(*(len(normalize(s)) for s in [{', '.join(inputs)}]))"
    )
    # why a subprocess with a generous limit: a regression fails in two minutes instead of hanging the suite for hours
    done = subprocess.run([sys.executable, "-c", script, grading.__file__], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "2", "200001", "200003", "7"], done.stderr[-500:]


@pytest.mark.parametrize(
    "answer, expected",
    [("5 cm", "5"), ("5 \\ cm", "5"), ("12 \\ \\text{degrees}", "12"), ("3 m^2", "3"), ("3\\text{ m}^2", "3"), ("18.0900", "18.09"),
     ("1.0.0", "1"), ("0.50", "0.5"), ("5.0e3", "5e3"), ("1,000.50", "1000.5")],
)
def test_normalization_keeps_its_results(answer: str, expected: str) -> None:
    """Results of the patterns before they were made linear (checked against the old ones on 200,000 random strings)."""
    assert normalize_answer(answer) == expected


def test_a_missing_grading_package_is_named_before_the_grading_process_starts(monkeypatch) -> None:
    import importlib.util

    from nabla_lc.bench import grading

    real = importlib.util.find_spec
    monkeypatch.setattr(grading.importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    g = Grader(timeout_s=5)
    with pytest.raises(grading.MissingDependencyError, match=r"math-verify, not installed here; install the bench extra: pip install 'nabla-lc\[bench\]'"):
        g.grade("1", "1")
    assert g._process is None


def test_a_grading_process_that_dies_on_start_says_so(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "math_verify.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # only the child sees the broken package
    with Grader(timeout_s=5) as g, pytest.raises(RuntimeError, match="exited with code 1 before it was ready"):
        g.grade("1", "1")


def test_bench_without_its_extra_names_the_package_before_loading_a_model(monkeypatch, tmp_path: Path, capsys) -> None:
    import importlib.util

    from nabla_lc.bench import grading
    from nabla_lc.cli import bench as bench_cli
    from nabla_lc.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(grading.importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    monkeypatch.setattr(bench_cli, "load_engine", lambda *a: pytest.fail("a model was loaded"))
    argv = ["bench", "--data", "arith", "--limit", "1", "--methods", "greedy", "--reward", "none", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == "nabla-lc: error: the benchmarks need math-verify, not installed here; install the bench extra: pip install 'nabla-lc[bench]'\n"
