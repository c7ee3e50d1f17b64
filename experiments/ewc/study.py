"""EWC vs finetune on Split Fashion-MNIST: run `python -m src.train` for every (method, λ, scenario, seed) and tabulate.

    python experiments/ewc/study.py --scenarios task class --seeds 0 1 2 --lambdas 100    # the README's tables
    python experiments/ewc/study.py --scenarios task --seeds 0 1 2 --lambdas 1 10 100 1000 10000 100000   # λ sweep

Runs go to outputs/ewc_study/<scenario>/<method>[_lam<λ>]/seed<s>/ (results.json, acc_matrix.png); a finished run is
not run again. Each run uses one thread (OMP_NUM_THREADS=1) and `--jobs` runs go in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_one(run_dir: Path, overrides: list[str]) -> dict:
    results = run_dir / "results.json"
    if not (results.exists() and json.loads(results.read_text())["status"] == "finished"):
        cmd = [sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", "callbacks=none", "logger=none",
               "save_checkpoints=false", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(results.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", default=["task", "class"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[100.0])
    parser.add_argument("--fisher", default="exact")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--matrices", action="store_true", help="also print the mean accuracy matrices")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "ewc_study"))
    args = parser.parse_args()

    jobs = []
    for scenario in args.scenarios:
        variants = [("finetune", ["method=finetune"])] + [
            (f"ewc_lam{lam:g}", ["method=ewc", f"method.lambda={lam}", f"method.fisher={args.fisher}"])
            for lam in args.lambdas
        ]
        for name, overrides in variants:
            for seed in args.seeds:
                run_dir = Path(args.out) / scenario / name / f"seed{seed}"
                jobs.append(((scenario, name, seed), run_dir,
                             [f"scenario={scenario}", f"seed={seed}", *overrides, *args.extra]))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip([key for key, _, _ in jobs], pool.map(lambda job: run_one(job[1], job[2]), jobs), strict=True))

    print(f"{'scenario':<9}{'method':<18}{'avg_acc':>16}{'forgetting':>16}{'bwt':>16}   per seed (avg_acc / forgetting)")
    for scenario in args.scenarios:
        for name in dict.fromkeys(name for (s, name, _) in results if s == scenario):
            runs = [results[(scenario, name, seed)] for seed in args.seeds]

            def cell(key, runs=runs):
                values = [100 * r[key] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):7.2f} ± {spread:5.2f}"

            per_seed = ", ".join(f"{100 * r['avg_acc']:.2f}/{100 * r['forgetting']:.2f}" for r in runs)
            print(f"{scenario:<9}{name:<18}{cell('avg_acc'):>16}{cell('forgetting'):>16}{cell('bwt'):>16}   {per_seed}")
    if args.matrices:
        for scenario in args.scenarios:
            for name in dict.fromkeys(name for (s, name, _) in results if s == scenario):
                runs = [results[(scenario, name, seed)] for seed in args.seeds]
                T = len(runs[0]["acc_matrix"])
                print(f"\n{scenario}-incremental, {name}: accuracy (%) on task j (columns) after training task i (rows),"
                      f" mean over seeds {args.seeds}")
                print("| after \\ on | " + " | ".join(f"T{j}" for j in range(T)) + " |")
                print("|---" * (T + 1) + "|")
                for i in range(T):
                    row = [statistics.mean(100 * r["acc_matrix"][i][j] for r in runs) for j in range(T)]
                    print(f"| T{i} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()
