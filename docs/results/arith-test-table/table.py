"""Issue 17's arith test table from result rows of several runs, on the problems every run has finished.

    python docs/results/arith-test-table/table.py docs/results/arith-test docs/results/arith-test-trust-region \
        docs/results/arith-test-rs-shipped

Each argument is a bench output directory; its rows are (problem, method, N) results. A run is named by its
directory and method, and a ∇ run's step by its run.json. Prints a markdown table (accuracy, complete model calls
and the paper's rule per problem, both rejection rates) and paired counts of each ∇ run against Best-of-8 and
against the ∇ runs before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nabla_lc.bench.report import paired_counts, sign_test

LABELS = {"greedy": "greedy", "bon": "Best-of-8", "sc": "self-consistency@8", "weighted_bon": "weighted Best-of-8"}


def runs(dirs: list[str]) -> dict[str, dict[int, dict]]:
    """Rows by run label, then by problem index (N = 8, or N = 1 for greedy)."""
    out: dict[str, dict[int, dict]] = {}
    for d in dirs:
        config = json.loads((Path(d) / "run.json").read_text())["config"]
        for line in (Path(d) / "results.jsonl").open():
            row = json.loads(line)
            if row["n"] != (1 if row["method"] == "greedy" else 8):
                continue
            if row["method"] == "nabla":
                step = "DTO off (plain rejection sampling)" if config["dto_steps"] == 0 else (
                    f"trust region KL {config['target_kl']}" if config.get("step") == "trust_region" else "paper's step")
                coupled = ", coupled rollouts" if config.get("coupled_rollouts") else ""
                label = f"∇, {step}{coupled} [{Path(d).name}]"
            else:
                label = f"{LABELS.get(row['method'], row['method'])} [{Path(d).name}]"
            out.setdefault(label, {})[row["index"]] = row
    return out


def main() -> None:
    table = runs(sys.argv[1:])
    common = sorted(set.intersection(*(set(rows) for rows in table.values())))
    print(f"{len(common)} problems every run has (indices {common[0]}..{common[-1]})\n")
    print("| run | accuracy | complete model calls | paper rule | rejection rate (proposals) | (generations) |")
    print("|---|---|---|---|---|---|")
    for label, rows in table.items():
        picked = [rows[i] for i in common]
        stats = [r["stats"] for r in picked]
        correct = sum(r["correct"] for r in picked)
        calls = sum(s["model_calls"] for s in stats) / len(stats)
        paper = sum(s["model_calls_paper"] for s in stats) / len(stats)
        proposals = sum(s["proposals"] for s in stats)
        rates = ("", "")
        if proposals:
            rejections = sum(s["rejections"] for s in stats)
            rates = (f"{rejections / proposals:.1%}", f"{rejections / (proposals + len(stats)):.1%}")
        print(f"| {label} | {correct / len(common):.1%} ({correct}/{len(common)}) | {calls:.1f} | {paper:.1f} | {rates[0]} | {rates[1]} |")
    print()
    nablas = [label for label in table if label.startswith("∇")]
    bon = [label for label in table if label.startswith("Best-of-8")]
    for k, label in enumerate(nablas):
        for other in bon + nablas[:k]:  # against Best-of-8 and every ∇ run listed before it
            wins, losses = paired_counts(table[label], table[other], common)
            print(f"{label} against {other}: solves {wins} it misses, misses {losses} it solves (sign test p = {sign_test(wins, losses):.2f})")


if __name__ == "__main__":
    main()
