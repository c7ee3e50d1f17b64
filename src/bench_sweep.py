"""A 4-job sweep on one machine, sequential against parallel: `python -m src.bench --sweep`.

Four jobs of the default protocol (EWC on Split Fashion-MNIST, `trainer.max_steps` per task so that the sweep
takes about a minute), each sweep one `python -m src.train -m … seed=0,1,2,3` process timed whole (wall clock):
- the basic launcher: one job after another, each with all the cores;
- joblib with n_jobs=2 and n_jobs=4 and `threads=auto` (cores ÷ n_jobs threads per job, src/continual/threads.py),
  with workers forked from a server that imported torch and Lightning once (`sweep_workers=forkserver`, the default,
  src/continual/sweep_workers.py) and with joblib's own fresh workers (`sweep_workers=loky`);
- joblib n_jobs=4 with `threads=<cores>`: every job with all the cores, as with an exported OMP_NUM_THREADS or a
  launcher that sets nothing (the oversubscription `threads=auto` prevents).
Target (issue 15): 4 parallel jobs on 2 cores no slower in total than 2 sequential pairs (joblib n_jobs=2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from src.config import ROOT
from src.continual.threads import available_cores

JOBS = 4
LOKY_RATIO = "loky: joblib n_jobs=4 ÷ joblib n_jobs=2"
SEEDS = "seed=" + ",".join(str(s) for s in range(JOBS))


def sweeps(cores: int) -> dict[str, list[str]]:
    return {
        "sequential (basic)": [],
        "joblib n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        "joblib n_jobs=4": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
        "joblib n_jobs=2, sweep_workers=loky": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep_workers=loky"],
        "joblib n_jobs=4, sweep_workers=loky": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "sweep_workers=loky"],
        f"joblib n_jobs=4, threads={cores} (oversubscribed)": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                                                              f"threads={cores}"],
    }


def run_sweep(overrides: list[str], sweep_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep_dir}", "callbacks=none", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    jobs = [json.loads((sweep_dir / str(n) / "results.json").read_text()) for n in range(JOBS)]
    return {"command": "python -m src.train -m " + " ".join(overrides), "wall_s": wall,
            "job_wall_s": [j["wall_time_s"] for j in jobs], "job_train_s": [j["timing_s"]["train"] for j in jobs],
            "threads": [j.get("threads") for j in jobs]}


def bench_sweep(extra: list[str], steps: int, tmp: Path) -> dict:
    cores = available_cores()
    common = [f"trainer.max_steps={steps}", *extra, SEEDS]
    runs = {name: run_sweep([*launcher, *common], tmp / f"sweep{i}")
            for i, (name, launcher) in enumerate(sweeps(cores).items())}
    sequential = runs["sequential (basic)"]["wall_s"]
    ratios = {f"{name} ÷ sequential": run["wall_s"] / sequential for name, run in runs.items()}
    ratios["joblib n_jobs=4 ÷ joblib n_jobs=2"] = runs["joblib n_jobs=4"]["wall_s"] / runs["joblib n_jobs=2"]["wall_s"]
    ratios[LOKY_RATIO] = (runs["joblib n_jobs=4, sweep_workers=loky"]["wall_s"]
                          / runs["joblib n_jobs=2, sweep_workers=loky"]["wall_s"])
    return {"kind": "sweep", "title": f"A {JOBS}-job sweep on one machine (default protocol, trainer.max_steps={steps})",
            "cores": cores, "steps_per_task": steps, "runs": runs, "ratios": ratios}


def render(result: dict) -> str:
    m, r = result["machine"], result["ratios"]
    met = r["joblib n_jobs=4 ÷ joblib n_jobs=2"] <= 1.0
    lines = [f"### {result['title']}", "",
             f"{m['cpu']} · {result['cores']} cores · torch {m['torch']} · {result['date']} · load (1, 5, 15 min) {result['load']}", "",
             f"`{result['command']}`", "",
             "| sweep | wall (s) | ÷ sequential | threads per job (intra-op / inter-op) |", "|---|---|---|---|"]
    for name, run in result["runs"].items():
        threads = run["threads"][0] or {}
        lines.append(f"| `{run['command']}` | {run['wall_s']:.1f} | {r[f'{name} ÷ sequential']:.2f} | "
                     f"{threads.get('intra_op')} / {threads.get('inter_op')} |")
    lines += ["", f"Target: 4 parallel jobs no slower than 2 sequential pairs: joblib n_jobs=4 ÷ n_jobs=2 = "
              f"{r['joblib n_jobs=4 ÷ joblib n_jobs=2']:.2f} (≤ 1: {'yes' if met else '**no**'})"
              + (f"; with joblib's own workers (sweep_workers=loky) {r[LOKY_RATIO]:.2f}." if LOKY_RATIO in r else ".")]
    return "\n".join(lines)
