"""Accuracy and mean complete / paper-rule model calls of every (run, method, N) at N = 4 and 8 in results.jsonl
files, over the problems with index < LIMIT that every such row has, and each row's paired counts against Best-of-N
at its N. ``path:m1,m2`` takes only those methods from a file.

    python docs/results/arith-test-search/subset.py LIMIT results.jsonl[:methods] [...]
"""
import json
import sys
from collections import defaultdict

from nabla_lc.bench.report import paired_counts, sign_test

limit = int(sys.argv[1])
rows = defaultdict(dict)
for arg in sys.argv[2:]:
    path, _, only = arg.partition(":")
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["index"] < limit and r["n"] in (4, 8) and (not only or r["method"] in only.split(",")):
                rows[(path.split("/")[-2], r["method"], r["n"])][r["index"]] = r
common = sorted(set.intersection(*(set(v) for v in rows.values())))
bon = {n: v for (run, m, n), v in rows.items() if m == "bon"}
print(f"{len(common)} problems every row has\n")
print("| run | method | N | accuracy | model calls | model calls (paper rule) | against Best-of-N: solves / misses (sign test p) |")
print("|---|---|---|---|---|---|---|")
for (run, m, n), v in rows.items():
    picked = [v[i] for i in common]
    k, correct = len(picked), sum(r["correct"] for r in picked)
    calls = sum(r["stats"]["model_calls"] for r in picked) / k
    paper = sum(r["stats"]["model_calls_paper"] for r in picked) / k
    paired = ""
    if n in bon and m != "bon":
        wins, losses = paired_counts(v, bon[n], common)
        paired = f"{wins} / {losses} (p = {sign_test(wins, losses):.2f})"
    print(f"| {run} | {m} | {n} | {100 * correct / k:.1f}% ({correct}/{k}) | {calls:.1f} | {paper:.1f} | {paired} |")
