#!/usr/bin/env bash
# bench --ray --workers 2 against the single-process bench on the same 40 arith test questions (greedy, the embedded
# model), one after the other on the same machine; writes single/, ray/ and times.json here.
# Run from the repository root: bash docs/results/ray-bench/run.sh
set -euo pipefail
OUT=docs/results/ray-bench
S="--data arith:test --limit 40 --methods greedy --set max_new_tokens=96 --set dto_positions=first"
export OMP_NUM_THREADS=1
rm -rf $OUT/single $OUT/ray
load0=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$(date +%s.%N)
nice -n 10 .venv/bin/nabla-lc bench $S --out $OUT/single
t1=$(date +%s.%N)
load1=$(cut -d' ' -f1-3 /proc/loadavg)
nice -n 10 .venv/bin/nabla-lc bench $S --out $OUT/ray --ray --workers 2
t2=$(date +%s.%N)
load2=$(cut -d' ' -f1-3 /proc/loadavg)
rm -f $OUT/*/*.png $OUT/*/*.lock
.venv/bin/python - "$OUT" "$t0" "$t1" "$t2" "$load0" "$load1" "$load2" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
from pathlib import Path
out, t0, t1, t2, load0, load1, load2, commit = sys.argv[1:]
def rows(name):
    return {(r["id"], r["method"], r["n"]): r for r in map(json.loads, (Path(out) / name / "results.jsonl").read_text().splitlines())}
single, ray = rows("single"), rows("ray")
same = lambda a, b: (a["text"], a["answer"], a["seed"], {k: v for k, v in a["stats"].items() if k != "wall_s"}) == (b["text"], b["answer"], b["seed"], {k: v for k, v in b["stats"].items() if k != "wall_s"})
single_s, ray_s = float(t1) - float(t0), float(t2) - float(t1)
report = {
    "commit": commit,
    "questions": len(single),
    "rows_identical_but_wall_s": single.keys() == ray.keys() and all(same(single[k], ray[k]) for k in single),
    "single_process_wall_s": round(single_s, 1),
    "ray_2_workers_wall_s": round(ray_s, 1),
    "wall_ratio_single_over_ray": round(single_s / ray_s, 3),
    "decode_s_sum_single": round(sum(r["stats"]["wall_s"] for r in single.values()), 1),
    "decode_s_sum_ray": round(sum(r["stats"]["wall_s"] for r in ray.values()), 1),
    "loadavg_1_5_15_before_single_after_single_after_ray": [load0, load1, load2],
}
(Path(out) / "times.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PY
