"""Aggregate the run folders of a sweep: mean ± sd over seeds of every metric, and the mean accuracy matrix.

    python experiments/lwf/summarize.py outputs/multirun/lwf_alpha [--matrix]

Runs are grouped by method, scenario and the LwF options that differ between them; seeds are averaged.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

KEYS = ("avg_acc", "forgetting", "bwt", "val_avg_acc")
OPTIONS = ("alpha", "temperature", "t_squared", "weighting", "lambda_o", "distill", "warmup_epochs")


def group_key(results: dict) -> tuple:
    method = results["config"]["method"]
    options = tuple(f"{k}={method[k]}" for k in OPTIONS if k in method)
    if "train_classes" in results["config"]["scenario"]:
        options += (f"train_classes={results['config']['scenario']['train_classes']}",)
    return results["method"], results["scenario"], options


def main(folder: str, matrix: bool) -> None:
    groups = defaultdict(list)
    for path in sorted(Path(folder).rglob("results.json")):
        results = json.loads(path.read_text())
        if results["status"] == "finished":
            groups[group_key(results)].append(results)
    for (method, scenario, options), runs in sorted(groups.items()):
        seeds = sorted(r["config"]["seed"] for r in runs)
        cells = []
        for key in KEYS:
            values = [100 * r[key] for r in runs if r.get(key) is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{key} {statistics.mean(values):6.2f} ± {sd:4.2f}")
        print(f"{method:9s} {scenario:6s} {' '.join(options):60s} seeds {seeds}: " + " | ".join(cells))
        if matrix:
            T = len(runs[0]["acc_matrix"])
            for i in range(T):
                row = [statistics.mean(100 * r["acc_matrix"][i][j] for r in runs) for j in range(T)]
                print("    " + " ".join(f"{a:6.2f}" for a in row))


if __name__ == "__main__":
    main(sys.argv[1], "--matrix" in sys.argv[2:])
