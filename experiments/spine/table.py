"""Print the table of experiments/spine/README.md from the run folders that run.sh made."""

import json
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/spine")
print("| method | scenario | avg acc (%) | forgetting (%) | BWT (%) | FWT (%) | task 0 after training it → at the end (%) |")
print("|---|---|---|---|---|---|---|")
for scenario in ("task", "class"):
    for method in ("finetune", "joint"):
        runs = [json.loads((out / f"{method}-{scenario}-{seed}" / "results.json").read_text()) for seed in range(3)]

        def cell(key, runs=runs):
            values = [100 * r[key] for r in runs]
            return f"{np.mean(values):.2f} ± {np.std(values):.2f}"

        first = " / ".join(f"{100 * r['acc_matrix'][0][0]:.1f}→{100 * r['acc_matrix'][-1][0]:.1f}" for r in runs)
        print(f"| {method} | {scenario} | {cell('avg_acc')} | {cell('forgetting')} | {cell('bwt')} | {cell('fwt')} "
              f"| {first} |")
