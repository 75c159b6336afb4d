"""After how many objective windows the pruner stopped each search's trials, from the cells' trials CSVs.

    python scripts/trial_stops.py scripts/results/search_quick/smollm2-135m

One line per search cell: the stopping rule (from the cell's JSON), and stopped trials counted by windows scored.
"""
from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import os
import sys


def stops(csv_path: str) -> collections.Counter:
    with open(csv_path, encoding="utf-8", newline="") as f:
        return collections.Counter(int(r["windows"]) for r in csv.DictReader(f) if r["state"] == "PRUNED")


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
            pruner = json.load(f).get("pruner", "?")
        counts = stops(path)
        total[(pruner, "after 1 window")] += counts[1]
        total[(pruner, "later")] += sum(n for w, n in counts.items() if w > 1)
        print(f"{os.path.basename(cell)}\t{pruner}\t" + " ".join(f"{w}:{n}" for w, n in sorted(counts.items())))
    for (pruner, when), n in sorted(total.items()):
        print(f"total\t{pruner}\t{when}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
