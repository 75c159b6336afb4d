"""After how many objective windows the pruner stopped each search's trials, from the cells' trials CSVs.

    python scripts/trial_stops.py scripts/results/search_quick/smollm2-135m

One line per search cell: the stopping rule (from the cell's JSON), and stopped trials counted by windows scored;
for trend_layer cells also each stage's trials, how many were stopped, and its best complete value (the trend
stage holds the trials begun before its share of the budget was spent, as the search switches stages).
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import math
import os
import sys


def read_trials(csv_path: str) -> list[dict]:
    """A cell's trials, in trial order (restart by restart)."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        return sorted(csv.DictReader(f), key=lambda r: (int(r.get("restart") or 0), int(r["number"])))


def stops(rows: list[dict]) -> collections.Counter:
    return collections.Counter(int(r["windows"]) for r in rows if r["state"] == "PRUNED")


def stages(rows: list[dict], cell: dict) -> str:
    """trend_layer: "trend a/b stopped, best v; layer c/d stopped, best w". Each trial's stage is its ``stage``
    column; CSVs written before it existed are replayed: the budget is what the search spent (per restart),
    rounded down, as it stops at the first trial that reaches it."""
    if cell.get("granularity") != "trend_layer" or not cell.get("search"):
        return ""
    out = {"trend": [], "layer": []}
    if all(r.get("stage") for r in rows):
        for r in rows:
            out[r["stage"]].append(r)
    else:
        share = cell.get("coarse_fraction") or 0.25  # cells made before the share was recorded ran a quarter
        restarts = collections.defaultdict(list)
        for r in rows:
            restarts[r.get("restart") or "0"].append(r)
        budget = math.floor(cell["search"]["cost_evals"] / len(restarts))
        windows = cell["search"]["objective_windows"]
        for group in restarts.values():
            spent = 0.0
            for r in group:
                out["trend" if spent < share * budget else "layer"].append(r)
                spent += int(r["windows"] or 0) / windows
    parts = []
    for stage, rs in out.items():
        done = [float(r["value"]) for r in rs if r["state"] == "COMPLETE"]
        stopped = sum(r["state"] == "PRUNED" for r in rs)
        parts.append(f"{stage} {stopped}/{len(rs)} stopped, best {min(done):.2f}" if done else f"{stage} -")
    return "\t" + "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cells_dir", help="a bench_search cells folder holding <cell>.trials.csv files")
    args = p.parse_args()
    paths = sorted(glob.glob(os.path.join(args.cells_dir, "*.trials.csv")))
    if not paths:
        print(f"error: no *.trials.csv in {args.cells_dir}", file=sys.stderr)
        return 2
    total = collections.Counter()
    for path in paths:
        cell = path[: -len(".trials.csv")]
        with open(cell + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        pruner = meta.get("pruner", "?")
        rows = read_trials(path)
        counts = stops(rows)
        total[(pruner, "after 1 window")] += counts[1]
        total[(pruner, "later")] += sum(n for w, n in counts.items() if w > 1)
        print(f"{os.path.basename(cell)}\t{pruner}\t" + " ".join(f"{w}:{n}" for w, n in sorted(counts.items()))
              + stages(rows, meta))
    for (pruner, when), n in sorted(total.items()):
        print(f"total\t{pruner}\t{when}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
