"""The fixed costs of a job, `python -m src.bench --startup`: what each import costs, and how the main job starts and ends.

1. Imports, each in fresh interpreters (`python -c`), interleaved round by round so that the machine's load hits them
   alike; medians of wall and CPU seconds. The pieces are cumulative (each includes the ones above it), so a piece's
   own cost is its difference to the piece it builds on. The floor of any PyTorch training is `import torch` plus
   `torch._dynamo`, which `torch.optim` imports when the first optimizer is built. The optional packages that
   torchmetrics would import, and a run no longer does (src/continual/lightning_import.py), are measured alone.
2. The budget: each piece's own CPU cost against a multiple of `import torch`'s, measured in the same rounds, so that
   the verdict does not depend on how loaded the machine is.
3. The main job, run as a user runs it, alternated with the same job through a given other checkout (`--baseline
   <folder>`, e.g. the main branch) so that before and after see the same load: wall time, first training step and
   the end (process end minus the final write of results.json, `timing_s.results_written`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from src.config import ROOT

RUN_IMPORTS = ("import src.train\nfrom src.continual.lightning_import import import_lightning\nimport_lightning()\n"
               "import src.continual.task_loop")
# name: (code, the piece it builds on)
PIECES = {
    "python": ("pass", None),
    "torch": ("import torch", "python"),
    "torch._dynamo (torch.optim imports it)": ("import torch, torch._dynamo", "torch"),
    "lightning, as a run imports it": ("import torch, torch._dynamo\nfrom src.continual.lightning_import import "
                                       "import_lightning\nimport_lightning()", "torch._dynamo (torch.optim imports it)"),
    "lightning, plain `import lightning`": ("import torch, torch._dynamo, lightning",
                                            "torch._dynamo (torch.optim imports it)"),
    "everything a run imports before its first step": (RUN_IMPORTS, "torch._dynamo (torch.optim imports it)"),
    "scipy.signal (alone; no longer imported)": ("import scipy.signal", "python"),
    "transformers (alone; no longer imported)": ("import transformers", "python"),
    "matplotlib.pyplot (alone; no longer imported)": ("import matplotlib.pyplot", "python"),
}
# A piece's own CPU seconds may be at most this many times `import torch`'s own (measured in the same rounds)
BUDGET_VS_TORCH = {
    "torch._dynamo (torch.optim imports it)": 1.0,
    "lightning, as a run imports it": 0.6,
    "everything a run imports before its first step": 1.0,
}
TEARDOWN_TARGET_S = 0.3
FIRST_STEP_TARGET_S = 1.5


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_python(code: str, cwd: Path = ROOT) -> tuple[float, float]:
    """Wall and CPU seconds of `python -c code` in a fresh interpreter."""
    cpu, start = _child_cpu(), time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return time.perf_counter() - start, _child_cpu() - cpu


def bench_imports(rounds: int) -> dict:
    samples = {name: [] for name in PIECES}
    for _ in range(rounds):
        for name, (code, _) in PIECES.items():
            samples[name].append(time_python(code))
    pieces = {}
    for name, (_, base) in PIECES.items():
        wall = statistics.median(s[0] for s in samples[name])
        cpu = statistics.median(s[1] for s in samples[name])
        pieces[name] = {"wall_s": wall, "cpu_s": cpu, "builds_on": base}
    for piece in pieces.values():
        base = pieces.get(piece["builds_on"])
        piece["own_wall_s"] = piece["wall_s"] - (base["wall_s"] if base else 0.0)
        piece["own_cpu_s"] = piece["cpu_s"] - (base["cpu_s"] if base else 0.0)
    torch_own = pieces["torch"]["own_cpu_s"]
    budget = {name: {"own_cpu_s": pieces[name]["own_cpu_s"], "budget_cpu_s": factor * torch_own,
                     "factor_of_torch": factor, "met": pieces[name]["own_cpu_s"] <= factor * torch_own}
              for name, factor in BUDGET_VS_TORCH.items()}
    return {"rounds": rounds, "pieces": pieces, "budget": budget}


def run_job(checkout: Path, overrides: list[str], run_dir: Path) -> dict:
    """`python -m src.train` from `checkout`: wall time, and the run's own clocks."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", *overrides], cwd=checkout,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the main job in {checkout} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    timing = results["timing_s"]
    # A checkout without `results_written`: its final write came at the end of the task loop's clock
    written = timing.get("results_written") or timing["startup"] + results["wall_time_s"]
    return {"wall_s": wall, "startup_s": timing["startup"], "first_step_s": timing["first_step"],
            "results_written_s": written, "end_after_results_s": wall - written, "train_s": timing["train"]}


def bench_jobs(overrides: list[str], rounds: int, baseline: Path | None, tmp: Path) -> dict:
    sides = {"this checkout": ROOT, **({"baseline": baseline} if baseline is not None else {})}
    runs = {side: [] for side in sides}
    for r in range(rounds):
        for side, checkout in sides.items():
            runs[side].append(run_job(checkout, overrides, tmp / f"{side.replace(' ', '_')}-{r}"))
    medians = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for side, rs in runs.items()}
    return {"command": "python -m src.train " + " ".join(overrides), "rounds": rounds,
            "baseline": str(baseline) if baseline else None, "runs": runs, "medians": medians}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_startup(overrides: list[str], rounds: int, baseline: Path | None, tmp: Path) -> dict:
    load_before = load_average()
    result = {"preset": "startup", "title": "Start-up and end of a job (imports, first step, teardown)",
              "imports": bench_imports(rounds), "jobs": bench_jobs(overrides, rounds, baseline, tmp)}
    result["load_average"] = {"before": load_before, "after": load_average()}
    return result


def render_startup(result: dict) -> str:
    m = result["machine"]
    load = result["load_average"]
    lines = [f"### {result['title']}", "",
             f"{m['cpu']} · {m['cores']} cores · torch {m['torch']} · {result['date']} · load average (1, 5, 15 min) "
             f"{load['before']} before, {load['after']} after", "", f"`{result['command']}`", "",
             f"Imports, each in fresh interpreters, {result['imports']['rounds']} interleaved rounds (medians, "
             "seconds; *own*: beyond the piece it builds on):", "",
             "| piece | wall | CPU | own wall | own CPU |", "|---|---|---|---|---|"]
    for name, p in result["imports"]["pieces"].items():
        lines.append(f"| {name} | {p['wall_s']:.2f} | {p['cpu_s']:.2f} | {p['own_wall_s']:.2f} | {p['own_cpu_s']:.2f} |")
    lines += ["", "Budget (own CPU seconds against a multiple of `import torch`'s own, same rounds):", "",
              "| piece | own CPU | budget | met |", "|---|---|---|---|"]
    for name, b in result["imports"]["budget"].items():
        lines.append(f"| {name} | {b['own_cpu_s']:.2f} | ≤ {b['factor_of_torch']} × torch = {b['budget_cpu_s']:.2f} "
                     f"| {'yes' if b['met'] else '**no**'} |")
    jobs = result["jobs"]
    lines += ["", f"Main job `{jobs['command'].strip()}`, {jobs['rounds']} rounds alternating"
              + (f" with the same job from `{jobs['baseline']}`" if jobs["baseline"] else "") + " (medians, seconds):",
              "", "| checkout | wall | start-up (to the task loop) | first training step | end after results.json "
              f"(target < {TEARDOWN_TARGET_S}) | training |", "|---|---|---|---|---|---|"]
    for side, med in jobs["medians"].items():
        lines.append(f"| {side} | {med['wall_s']:.2f} | {med['startup_s']:.2f} | {med['first_step_s']:.2f} | "
                     f"{med['end_after_results_s']:.2f} | {med['train_s']:.2f} |")
    return "\n".join(lines)
