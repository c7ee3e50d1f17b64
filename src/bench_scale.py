"""Cost per task as the sequence grows: `python -m src.bench --scale`.

Permuted Fashion-MNIST (domain-incremental, one shared head), 50 tasks of a fixed number of steps, for finetune, EWC
in separate and in online mode, and LwF, read at tasks 5, 20 and 50 (a 5- or 20-task run trains its tasks exactly as
the first 5 or 20 of the 50-task run: same permutations, same steps; only its evaluations cover fewer tasks, and
evaluation is reported apart). Each run is `python -m src.train` in a subprocess,
split per task by the run's own clocks (results.json `task_costs`: train / task end / evaluation / checkpoint
seconds, resident memory at the task's end, checkpoint size). Evaluation is on `dataset.eval_max_samples` samples per
task, after every 5th task (its cost grows with the tasks evaluated, which is what `eval.every_n_tasks` and
`eval.tasks` are for).
Target (issue 15): the cost of a task, evaluation excluded, at task 50 ≤ 1.2 × at task 5 (medians over the five
tasks ending there, of the 50-task run), judged on CPU seconds (the wall clock of a shared machine follows the
neighbours' load; both are reported).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from src.config import ROOT

TARGET = 1.2
LENGTHS = (5, 20, 50)
# EWC's Fisher on 1,000 samples per task: a constant per task either way, so a smaller one hides less of what grows
METHODS = {"finetune": ["method=finetune"],
           "ewc separate": ["method=ewc", "method.mode=separate", "method.fisher_samples=1000"],
           "ewc online": ["method=ewc", "method.mode=online", "method.fisher_samples=1000"], "lwf": ["method=lwf"]}
PARTS = ("train_s", "task_end_s", "checkpoint_s", "eval_s")
CPU_PARTS = ("train_cpu_s", "task_end_cpu_s", "checkpoint_cpu_s")


def run(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", "callbacks=none", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"wall_s": wall, "task_costs": results["task_costs"], "peak_rss_mb": results["peak_memory_mb"]["rss"]}


def at_task(costs: list[dict], task: int, window: int = 5) -> dict:
    """Medians over the `window` tasks ending at `task` (1-based) of each part, and of their sum without evaluation."""
    rows = costs[max(0, task - window) : task]
    out = {part: statistics.median(r.get(part, 0.0) for r in rows) for part in PARTS}
    out["eval_s"] = rows[-1]["eval_s"]  # the evaluation after task t itself (with eval.every_n_tasks, the only one)
    out["without_eval_s"] = statistics.median(sum(r.get(p, 0.0) for p in PARTS if p != "eval_s") for r in rows)
    # CPU seconds: what the task cost this process, whatever the machine's other load did to the wall clock
    out["without_eval_cpu_s"] = statistics.median(sum(r.get(p, 0.0) for p in CPU_PARTS) for r in rows)
    out["eval_cpu_s"] = rows[-1].get("eval_cpu_s", 0.0)
    out["rss_mb"] = rows[-1]["rss_mb"]
    out["checkpoint_mb"] = rows[-1].get("checkpoint_mb")
    return out


def bench_scale(extra: list[str], steps: int, eval_samples: int, tmp: Path, lengths=LENGTHS) -> dict:
    # evaluation after every 5th task (t = 5, 20, 50 included) on every task: its growth shows, at a tenth of the cost
    common = ["dataset=permuted_fmnist", "scenario=domain", f"trainer.max_steps={steps}",
              f"dataset.eval_max_samples={eval_samples}", f"eval.every_n_tasks={min(lengths)}", *extra]
    longest = max(lengths)
    runs = {method: run([*overrides, f"dataset.tasks.n_tasks={longest}", *common],
                        tmp / f"{method.replace(' ', '_')}-{longest}") for method, overrides in METHODS.items()}
    return result_of(runs, common, steps, lengths, eval_samples)


def summarize(run: dict, lengths) -> dict:
    """Costs at each of `lengths` the run reached (a run cut short: also at its last task) and the growth from the
    first to the last of them."""
    n = len(run["task_costs"])
    reached = [t for t in lengths if t <= n] + ([n] if n < max(lengths) else [])
    points = {str(t): at_task(run["task_costs"], t) for t in reached}
    first, last = points[str(reached[0])], points[str(reached[-1])]
    return {"at_task": points, "tasks_done": n, "growth_without_eval": last["without_eval_s"] / first["without_eval_s"],
            "growth_without_eval_cpu": last["without_eval_cpu_s"] / first["without_eval_cpu_s"],
            "growth_eval": last["eval_s"] / first["eval_s"] if min(first["eval_s"], last["eval_s"]) > 1e-3 else None,
            "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}


def result_of(runs: dict, common: list[str], steps: int, lengths, eval_samples: int) -> dict:
    summary = {method: summarize(r, lengths) for method, r in runs.items()}
    return {"kind": "scale", "title": f"Cost per task as the sequence grows (permuted Fashion-MNIST, domain-IL, "
            f"{steps} steps per task)", "command_overrides": common, "steps_per_task": steps, "lengths": list(lengths),
            "eval_max_samples": eval_samples, "runs": runs, "summary": summary, "target": TARGET}


def render(result: dict) -> str:
    m = result["machine"]
    lengths = [str(n) for n in result["lengths"]]
    lines = [f"### {result['title']}", "",
             f"{m['cpu']} · {m['cores']} cores ({m['torch_threads']} torch threads in the bench process) · torch {m['torch']} · "
             f"{result['date']} · load (1, 5, 15 min) {result['load']}", "",
             f"`{result['command']}` (each run: `python -m src.train {' '.join(result['command_overrides'])} "
             f"method=… dataset.tasks.n_tasks={lengths[-1]}`)", "",
             "Per task, medians over the five tasks ending at task t of the longest run (seconds, wall and CPU; eval: "
             "the evaluation after task t, on every task; memory: resident at the task's end; checkpoint: last.ckpt's "
             "size):", "",
             "| method | t | train | task end | checkpoint | **without eval** (CPU s) | eval (CPU s) | RSS (MB) | "
             "ckpt (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for method, s in result["summary"].items():
        for t, p in s["at_task"].items():
            ckpt = f"{p['checkpoint_mb']:.1f}" if p.get("checkpoint_mb") is not None else "-"
            lines.append(f"| {method} | {t} | {p['train_s']:.3f} | {p['task_end_s']:.3f} | {p['checkpoint_s']:.3f} | "
                         f"**{p['without_eval_s']:.3f}** ({p['without_eval_cpu_s']:.3f}) | {p['eval_s']:.3f} ({p['eval_cpu_s']:.3f}) | "
                         f"{p['rss_mb']:.0f} | {ckpt} |")
    lines += ["", "| method | without eval, CPU: task " + f"{lengths[-1]} ÷ task {lengths[0]} | target | met | wall | eval: task "
              f"{lengths[-1]} ÷ task {lengths[0]} | wall of the run (s) | peak RSS (MB) |",
              "|---|---|---|---|---|---|---|---|"]
    for method, s in result["summary"].items():
        g, points = s["growth_without_eval_cpu"], list(s["at_task"])
        cut = "" if points[-1] == lengths[-1] else f" (task {points[-1]} ÷ task {points[0]}: run stopped)"
        met = "n/a" if cut else ("yes" if g <= result["target"] else "**no**")
        eval_growth = "-" if s["growth_eval"] is None else f"{s['growth_eval']:.1f}"
        wall = "-" if s["wall_s"] is None else f"{s['wall_s']:.0f}"
        lines.append(f"| {method} | {g:.2f}{cut} | ≤ {result['target']} | {met} | {s['growth_without_eval']:.2f} | "
                     f"{eval_growth} | {wall} | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines)
