"""Math prompts, answer extraction and equivalence grading with two independent graders.

The verdict comes from math-verify; a second grader in the style of Qwen2.5-Math's evaluation
(normalise the LaTeX, compare as strings, as numbers, element-wise, then symbolically with sympy)
is run beside it, and every disagreement between the two is recorded.

Both graders run in a child process (:class:`Grader`), so a call that runs too long (sympy can
spend minutes on ``9^{9^{9^9}}``) is stopped by killing the process. This works from any thread,
unlike math-verify's own ``signal.alarm`` timeouts, which are switched off here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system message of math prompts (Qwen2.5-Math's chain-of-thought prompt)."""

BENCH_EXTRA = "pip install 'nabla-lc[bench]'"
"""How to install the packages the benchmarks need."""
BENCH_PACKAGES = {"math_verify": "math-verify", "sympy": "sympy", "matplotlib": "matplotlib"}
"""Import name -> distribution name of the ``bench`` extra's packages."""
GRADING_MODULES = ("math_verify", "sympy")
"""What the grading process imports."""

DEFAULT_TIMEOUT_S = 10.0
"""Seconds one grader may spend on one comparison before it is stopped."""
_START_TIMEOUT_S = 120.0


class MissingDependencyError(ModuleNotFoundError):
    """An optional package is not installed; the message names it and the install command."""


def require_bench_extra(modules: Iterable[str] = tuple(BENCH_PACKAGES)) -> None:
    """Raise :class:`MissingDependencyError` unless every one of ``modules`` (of :data:`BENCH_PACKAGES`) is installed."""
    missing = [BENCH_PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"the benchmarks need {', '.join(missing)}, not installed here; install the bench extra: {BENCH_EXTRA}")


# ---------------------------------------------------------------------------------------------
# Extraction


def extract_answer(text: str) -> str | None:
    """The final answer of a response, normalised (:func:`normalize_answer`) so equal answers vote together."""
    from ..answers import find_answer  # why here: the grading subprocess runs this file alone, without the package

    answer = find_answer(text)
    return normalize_answer(answer) if answer is not None else None


# ---------------------------------------------------------------------------------------------
# Normalisation (after Qwen2.5-Math's ``strip_string``)

_UNITS = (
    "degrees", "degree", "cm", "centimeters", "meters", "meter", "m", "km", "kilometers", "inches", "inch",
    "feet", "foot", "ft", "miles", "mile", "mph", "hours", "hour", "minutes", "minute", "seconds", "second",
    "days", "day", "weeks", "years", "dollars", "dollar", "cents", "cent", "units", "unit", "square", "sq",
    "cubic", "pounds", "ounces", "grams", "kg", "liters", "students", "people", "points", "ways", "percent",
)
# why ``\s*(?:(?:\\,|\\ )\s*)?`` and not ``\s*(?:\\,|\\ )?\s*``: two adjacent ``\s*`` split a run of n spaces n ways,
# so a digit followed by many spaces took quadratic time (26 s on one 387-token response)
_TRAILING_UNIT = re.compile(r"(\d)\s*(?:(?:\\,|\\ )\s*)?(?:" + "|".join(_UNITS) + r")(?:\^?\{?[23]\}?)?\s*$")


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer: no ``\\text{}``, units, ``\\left``/``\\right``, degrees, ``\\!``, spaces; ``dfrac``→``frac``."""
    s = str(answer).strip().replace("\n", "").rstrip(".")
    for old, new in (
        ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "), ("tfrac", "frac"), ("dfrac", "frac"),
        ("\\left", ""), ("\\right", ""), ("\\{", "{"), ("\\}", "}"), ("\\displaystyle", ""),
        ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""), ("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", ""),
        ("\\%", ""), ("%", ""), ("\\neq", "\\ne"), ("\\leq", "\\le"), ("\\geq", "\\ge"), ("\\infinity", "\\infty"),
    ):
        s = s.replace(old, new)
    # why ``\s*(?:[a-zA-Z][a-zA-Z ]*)?`` for ``\s*[a-zA-Z ]*``: the same texts, but spaces can no longer go to either part
    without_unit = re.sub(r"\\(?:text|mbox|mathrm)\{\s*(?:[a-zA-Z][a-zA-Z ]*)?\}(?:\^?\{?[23]\}?)?$", "", s).strip()
    if without_unit and without_unit != s and re.search(r"[\d}]$", without_unit):
        s = without_unit  # a trailing ``\text{ cm}`` is a unit
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{(.*?)\}", r"\1", s)
    s = _TRAILING_UNIT.sub(r"\1", s).strip()
    if len(s.split("=")) == 2 and len(s.split("=")[0].strip()) <= 2:  # ``x = 5`` → ``5``
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    # why ``(?<!\d)`` and ``(?:\d*[1-9])?`` (same matches as without and ``\d*?``): one try per digit run, each linear
    s = re.sub(r"(?<!\d)(\d+)\.0+(?!\d)", r"\1", s)  # ``18.0`` → ``18``
    s = re.sub(r"(?<!\d)(\d+\.(?:\d*[1-9])?)0+(?!\d)", r"\1", s)  # ``18.90`` → ``18.9``
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ``.5`` → ``0.5``
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return re.sub(r"(\\|,|\.)+$", "", s)


# ---------------------------------------------------------------------------------------------
# The two graders (run inside the grading process)


def math_verify_equal(answer: str, reference: str) -> bool | None:
    """math-verify's verdict, or ``None`` when the reference does not parse."""
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=None)  # type: ignore[arg-type]  # None: our process timeout
    if not gold:
        return None
    pred = parse(f"${answer}$", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold, pred, timeout_seconds=None))


def normalized_equal(answer: str, reference: str) -> bool:
    """Qwen2.5-Math-style equivalence: normalised strings, numbers, tuples element-wise, then sympy."""
    a, b = normalize_answer(answer), normalize_answer(reference)
    if a == b or a.lower() == b.lower():
        return True
    x, y = _number(a), _number(b)
    if x is not None and y is not None:
        return any(math.isclose(x, v, rel_tol=1e-4, abs_tol=1e-9) for v in (y, y / 100, y * 100))
    parts_a, parts_b = _tuple_parts(a), _tuple_parts(b)
    if parts_a is not None and parts_b is not None:
        same_brackets = (a[0], a[-1]) == (b[0], b[-1]) or not (a[0] in "([" and b[0] in "([")
        return same_brackets and len(parts_a) == len(parts_b) and all(map(normalized_equal, parts_a, parts_b))
    return _symbolic_equal(a, b)


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _tuple_parts(s: str) -> list[str] | None:
    """Top-level comma-separated parts of ``(a,b)``, ``[a,b)`` or ``a,b``; ``None`` for a single item."""
    inner = s[1:-1] if s[:1] in "([" and s[-1:] in ")]" else s
    parts, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return parts if len(parts) > 1 else None


_FUNCTIONS = {"sqrt", "pi", "oo", "log", "sin", "cos", "tan", "cot", "sec", "csc", "exp", "I"}


def _to_sympy(s: str):  # -> sympy.Expr | None
    """Parse a normalised LaTeX answer with sympy, allowing only numbers, one-letter symbols and known functions."""
    from sympy.parsing.sympy_parser import convert_xor, implicit_multiplication_application, parse_expr, standard_transformations

    if re.search(r"\^\{[^{}]*\^", s):
        return None  # why: sympy would spend minutes evaluating a tower such as 9^{9^{9^9}}
    for _ in range(s.count("\\frac") + s.count("\\sqrt")):
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"\\(pi|sin|cos|tan|cot|sec|csc|log|exp)\b", r" \1 ", s).replace("\\ln", " log ")
    s = s.replace("\\infty", " oo ").replace("\\cdot", "*").replace("\\times", "*").replace("{", "(").replace("}", ")")
    if "\\" in s or not re.fullmatch(r"[\w+\-*/^().\s]*", s) or "_" in s or len(s) > 200:
        return None
    if any(len(name) > 1 and name not in _FUNCTIONS for name in re.findall(r"[A-Za-z]+", s)):
        return None  # why: parse_expr evaluates Python, so only known names may reach it
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(s, transformations=transformations)


def _symbolic_equal(a: str, b: str) -> bool:
    import sympy

    x, y = _to_sympy(a), _to_sympy(b)
    if x is None or y is None:
        return False
    if sympy.simplify(x - y) == 0:
        return True
    try:
        return bool(abs(complex(sympy.N(x - y))) < 1e-6)
    except (TypeError, ValueError):
        return False


_GRADERS: dict[str, Callable[[str, str], "bool | None"]] = {
    "math_verify": math_verify_equal,
    "normalized": normalized_equal,
}


# ---------------------------------------------------------------------------------------------
# Verdicts and the grading process


@dataclass(frozen=True)
class Verdict:
    """The grade of one answer: the final verdict and what each grader said (``None``: no verdict)."""

    correct: bool
    """The verdict: math-verify's, or the normalising grader's where math-verify gave none."""
    math_verify: bool | None = None
    normalized: bool | None = None
    timed_out: bool = False
    """A grader ran past the timeout and was stopped."""

    @property
    def disagree(self) -> bool:
        """Both graders gave a verdict and they differ."""
        return self.math_verify is not None and self.normalized is not None and self.math_verify != self.normalized


def combine(math_verify: bool | None, normalized: bool | None, timed_out: bool = False) -> Verdict:
    """The verdict rule: math-verify decides; the normalising grader decides only where math-verify cannot."""
    correct = math_verify if math_verify is not None else bool(normalized)
    return Verdict(correct, math_verify, normalized, timed_out)


def _serve() -> None:
    """The grading process: read ``[grader, answer, reference]`` lines, write each verdict as a JSON line."""
    logging.basicConfig(level=logging.ERROR)  # why: math-verify warns that its own timeouts are off
    math_verify_equal("1", "1")  # why: imports and parser set-up (~2 s) before "ready", never inside a timeout

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        name, answer, reference = json.loads(line)
        try:
            verdict = _GRADERS[name](answer, reference)
        except Exception:  # why: a grader's failure is "no verdict", never a crash
            verdict = None
        print(json.dumps(verdict), flush=True)


_RUN_FILE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
# why run the file, not ``-m nabla_lc.bench.grading``: the package imports torch, seconds per start


class _TimedOut:
    pass


class Grader:
    """Grades answers in a child process that is killed and restarted when a call exceeds ``timeout_s``.

    Thread-safe (calls are serialised). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None

    def grade(self, answer: str | None, reference: str) -> Verdict:
        """Grade ``answer`` against ``reference`` (``None``: nothing was extracted, graded wrong)."""
        if answer is None or not answer.strip():
            return Verdict(False, False, False)
        results = [self._call(name, answer, reference) for name in _GRADERS]
        timed_out = any(isinstance(r, _TimedOut) for r in results)
        mv, nm = (None if isinstance(r, _TimedOut) else r for r in results)
        verdict = combine(mv, nm, timed_out)
        if verdict.disagree:
            log.info("graders disagree on %r vs reference %r: math-verify %s, normalised %s", answer, reference, mv, nm)
        return verdict

    def _call(self, name: str, answer: str, reference: str) -> "bool | _TimedOut | None":
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            assert self._process is not None and self._process.stdin is not None
            self._process.stdin.write(json.dumps([name, answer, reference]) + "\n")
            self._process.stdin.flush()
            reply = self._read(self.timeout_s)
            if reply is not None:
                return json.loads(reply)
            log.warning("grader %s gave no verdict within %.1f s on %r vs %r; restarting it", name, self.timeout_s, answer, reference)
            self._stop()
            return _TimedOut()

    def _read(self, timeout_s: float) -> str | None:
        """One line from the process, or ``None`` when none came within ``timeout_s``."""
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        return self._process.stdout.readline() or None if ready else None

    def _start(self) -> None:
        require_bench_extra(GRADING_MODULES)  # why: a process that dies on its imports would read as a start timeout
        # why a fresh interpreter (not fork): forking is unsafe from threads and with CUDA
        self._process = subprocess.Popen(
            [sys.executable, "-c", _RUN_FILE, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        if self._read(_START_TIMEOUT_S) is None:
            try:  # why wait: a process that closed its output is exiting, but may not be reaped yet
                code: int | None = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            self._stop()
            if code is not None:
                raise RuntimeError(f"the grading process exited with code {code} before it was ready (its error is printed above)")
            raise RuntimeError(f"the grading process did not start within {_START_TIMEOUT_S} s")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            for pipe in (self._process.stdin, self._process.stdout):
                if pipe is not None:
                    pipe.close()
        self._process = None

    def close(self) -> None:
        """Stop the grading process."""
        with self._lock:
            self._stop()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve()
