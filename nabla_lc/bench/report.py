"""Summaries and plots of benchmark results: ``summary.json``, ``summary.md``, ``scaling.png``, ``cost.png``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..methods import get_method, method_names
from .output import write_atomic

log = logging.getLogger(__name__)


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, N), in the order rows first show them.

    Means are over problems; ``wall_s`` is each request's own ``Stats.wall_s`` (for a batch the engine
    gives every request an equal share of the batch's wall time).
    ``rejection_rate`` is rejections over proposals; ``rejection_rate_generations`` (the paper's) is rejections
    over generations, each ∇ request's first rollout and its proposals (0 for the sampling methods); the skip rates are ``skipped_entropy`` and
    ``skipped_gradient`` over positions, each summed over the group's problems (0 when the denominator is).
    ``probe_reuse_rate`` is probes answered without a pass over probes (rows written before probe reuse
    existed have no ``probes_reused`` and count 0).
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["n"]), []).append(row)
    return [_summarize_group(method, n, group) for (method, n), group in groups.items()]


def _summarize_group(method: str, n: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    count = len(rows)

    def total(key: str) -> float:
        return sum(r["stats"].get(key, 0) for r in rows)

    return {
        "method": method,
        "n": n,
        "count": count,
        "accuracy": sum(bool(r["correct"]) for r in rows) / count,
        "model_calls": total("model_calls") / count,
        "model_calls_paper": total("model_calls_paper") / count,
        "wall_s": total("wall_s") / count,
        "rejection_rate": _ratio(total("rejections"), total("proposals")),
        "rejection_rate_generations": _ratio(total("rejections"), total("proposals") + count),
        "skip_entropy_rate": _ratio(total("skipped_entropy"), total("positions")),
        "skip_gradient_rate": _ratio(total("skipped_gradient"), total("positions")),
        "probe_reuse_rate": _ratio(total("probes_reused"), total("probes")),
        "disagreements": sum(bool(r.get("disagree")) for r in rows),
        "grade_timeouts": sum(bool(r.get("grade_timed_out")) for r in rows),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


_COLUMNS = (
    ("method", "method", "{}"),
    ("n", "N", "{}"),
    ("count", "problems", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("model_calls", "model calls", "{:.1f}"),
    ("model_calls_paper", "model calls (paper rule)", "{:.1f}"),
    ("wall_s", "wall s / problem", "{:.2f}"),
    ("rejection_rate", "rejection rate (proposals)", "{:.1%}"),
    ("rejection_rate_generations", "rejection rate (generations)", "{:.1%}"),
    ("skip_entropy_rate", "skipped (entropy)", "{:.1%}"),
    ("skip_gradient_rate", "skipped (gradient)", "{:.1%}"),
    ("probe_reuse_rate", "probes reused", "{:.1%}"),
    ("disagreements", "grader disagreements", "{}"),
    ("grade_timeouts", "grading timeouts", "{}"),
)


def to_markdown(groups: Sequence[dict[str, Any]], title: str = "Benchmark summary") -> str:
    """The summary as a Markdown table."""
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for g in groups:
        lines.append("| " + " | ".join(fmt.format(g[key]) for key, _, fmt in _COLUMNS) + " |")
    lines += [
        "",
        "Model calls are means per problem: *complete* counts every forward and backward pass of the policy and the",
        "reward model; the *paper rule* is +1 per rollout token, +4 per uncached DTO step, +2 per rejection comparison.",
        "Rejection rate (proposals): rejections / proposals; (generations), the paper's: rejections / (proposals + 1 first",
        "rollout per problem), so i.i.d. proposals at N = 8 give 75.5% and 66.0%; skip rates: skipped positions / positions; probes reused: probes",
        "answered by an earlier probe's pass on the same response / probes (sums over problems).",
        "",
    ]
    return "\n".join(lines)


def plot_scaling(groups: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against mean model calls (complete and paper rule), one curve per method (the paper's Fig. 4)."""
    from matplotlib.figure import Figure  # why not pyplot: no global backend state in a library

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("model_calls", "model_calls_paper"), ("complete", "paper rule")):
        _curves(ax, groups, key)
        ax.set_xlabel(f"mean model calls per problem ({label})")
    fig.savefig(path, dpi=120)


def plot_cost(groups: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against mean wall time per problem, one curve per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.8, 4.2), layout="constrained")
    ax = fig.subplots()
    _curves(ax, groups, "wall_s")
    ax.set_xlabel("mean wall time per problem (s)")
    fig.savefig(path, dpi=120)


def _runs_once(method: str) -> bool:
    """Whether a method is plotted as one point (a star); results may name methods no longer registered."""
    return method in method_names() and get_method(method).runs_once


def _curves(ax: Any, groups: Sequence[dict[str, Any]], x_key: str) -> None:
    for method in dict.fromkeys(g["method"] for g in groups):
        points = sorted((g for g in groups if g["method"] == method), key=lambda g: g["n"])
        xs, ys = [g[x_key] for g in points], [100 * g["accuracy"] for g in points]
        once = _runs_once(method)
        ax.plot(xs, ys, marker="*" if once else "o", markersize=10 if once else 5,
                linestyle="none" if len(points) == 1 else "-", label=method)
        for g, x, y in zip(points, xs, ys):
            if not once:
                ax.annotate(f"N={g['n']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if all(g[x_key] > 0 for g in groups):
        ax.set_xscale("log")
    ax.set_ylim(0, min(100, max(10, 115 * max(g["accuracy"] for g in groups))))
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()


def common_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the problems that every (method, N) has: the paired subset of a partial run."""
    problems: dict[tuple[str, int], set[str]] = {}
    for row in rows:
        problems.setdefault((row["method"], row["n"]), set()).add(row["id"])
    shared = set.intersection(*problems.values()) if problems else set()
    return [r for r in rows if r["id"] in shared]


def paired_counts(rows: Mapping[int, dict[str, Any]], base: Mapping[int, dict[str, Any]], problems: Iterable[int]) -> tuple[int, int]:
    """Over ``problems`` (keys of both), how many ``rows`` solves that ``base`` misses, and how many the reverse."""
    wins = losses = 0
    for i in problems:
        wins += bool(rows[i]["correct"] and not base[i]["correct"])
        losses += bool(base[i]["correct"] and not rows[i]["correct"])
    return wins, losses


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test on the discordant pairs of a paired comparison."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def write_report(out_dir: Path | str, rows: Sequence[dict[str, Any]], title: str = "Benchmark summary") -> list[dict[str, Any]]:
    """Write ``summary.json``, ``summary.md``, ``scaling.png`` and ``cost.png`` into ``out_dir``; return the summary.

    When the (method, N) groups cover different problems (a partial run), the summary adds a second table
    over the problems they all have, and the plots show that paired subset, so every curve is comparable.
    """
    out_dir = Path(out_dir)
    groups = summarize(rows)
    paired = common_rows(rows)
    partial = len(paired) != len(rows)
    summary: dict[str, Any] = {"groups": groups}
    markdown = to_markdown(groups, title)
    if partial:
        summary["common"] = summarize(paired)
        count = len({r["id"] for r in paired})
        summary["common_problems"] = count
        markdown += "\n" + to_markdown(summary["common"], f"The {count} problems every method and N has (paired)").replace("# ", "## ", 1)
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out_dir / "summary.md", markdown)
    plotted = summary["common"] if partial else groups
    if plotted:
        plot_scaling(plotted, out_dir / "scaling.png")
        plot_cost(plotted, out_dir / "cost.png")
    log.info("wrote the summary and plots of %d rows to %s", len(rows), out_dir)
    return groups
