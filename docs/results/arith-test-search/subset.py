"""Accuracy and mean complete / paper-rule model calls of every (method, N) in results.jsonl files, over problems index < LIMIT."""
import json, sys
from collections import defaultdict
limit = int(sys.argv[1])
rows = defaultdict(list)
for path in sys.argv[2:]:
    for line in open(path):
        r = json.loads(line)
        if r["index"] < limit:
            s = r["stats"]
            rows[(path.split("/")[-2], r["method"], r["n"])].append((r["correct"], s["model_calls"], s["model_calls_paper"], s["wall_s"]))
print("| run | method | N | problems | accuracy | model calls | model calls (paper rule) |")
print("|---|---|---|---|---|---|---|")
for (run, m, n), v in rows.items():
    k = len(v)
    print(f"| {run} | {m} | {n} | {k} | {100*sum(c for c,*_ in v)/k:.1f}% ({sum(c for c,*_ in v)}/{k}) | {sum(x[1] for x in v)/k:.1f} | {sum(x[2] for x in v)/k:.1f} |")
