"""The per-task input transform against the model's step: `python -m src.bench --transforms`.

Permuted and rotated Fashion-MNIST train on every image under the task's permutation or rotation. Per batch, a
rotation (affine_grid + grid_sample) cost more than the MLP's step (issue 15); the DataModule now transforms a task's
training images once when the task starts (`dataset.cache_task_transform`, src/data/datamodule.py). Measured in one
process, interleaved round by round through `Trainer.fit` (finetune, task 1): split, permuted and rotated with the
cache, and permuted and rotated transformed per batch (the previous behaviour); plus the one-off cost of building a
task's cache. Target: rotated step ≤ 1.2 × permuted step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from src.bench import build, framework_epoch, median_ratio, start_task, timed

TARGET_ROTATED_VS_PERMUTED = 1.2
CONTENDERS = {
    "split": ["dataset=split_fmnist"],
    "permuted": ["dataset=permuted_fmnist"],
    "rotated": ["dataset=rotated_fmnist"],
    "permuted, per batch": ["dataset=permuted_fmnist", "dataset.cache_task_transform=false"],
    "rotated, per batch": ["dataset=rotated_fmnist", "dataset.cache_task_transform=false"],
}


def bench_transforms(extra: list[str], rounds: int, steps: int, tmp: Path) -> dict:
    loops = {}
    for name, overrides in CONTENDERS.items():
        folder = tmp / "".join(c for c in name if c.isalnum())
        loop, _ = build("finetune", [*overrides, "callbacks=none", "logger=none", *extra], folder)
        if loop.dm.cache_task_transform and loop.dm.tasks.transforms_inputs:  # a step as in a task of >= 1 epoch,
            loop.dm._caches_transform = lambda: True  # where the cache is used (not in the few steps measured here)
        loop.module.trained_up_to = 0
        start_task(loop, 1)
        framework_epoch(loop, 1, 2)  # warm-up (and the task's cache)
        assert (loop.dm._transform_cache is not None) == ("per batch" not in name and name != "split"), name
        loops[name] = loop
    device = loops["split"].module.device
    seconds = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            seconds[name].append(timed(device, lambda loop=loop: framework_epoch(loop, 1, steps)) / steps)
    build_s = {}
    for name in ("permuted", "rotated"):  # the one-off cost per task: transform the task's training images
        dm = loops[name].dm
        dm._transform_cache = None
        start = time.perf_counter()
        dm._task_cache(device)
        build_s[name] = time.perf_counter() - start
    step_s = {name: statistics.median(v) for name, v in seconds.items()}
    ratios = {
        "rotated_vs_permuted_step": median_ratio(seconds["rotated"], seconds["permuted"]),
        "rotated_vs_split_step": median_ratio(seconds["rotated"], seconds["split"]),
        "permuted_vs_split_step": median_ratio(seconds["permuted"], seconds["split"]),
        "rotated_per_batch_vs_permuted_per_batch_step": median_ratio(seconds["rotated, per batch"],
                                                                    seconds["permuted, per batch"]),
        "rotated_per_batch_vs_split_step": median_ratio(seconds["rotated, per batch"], seconds["split"]),
    }
    task_steps = loops["rotated"].dm.train_dataloader().steps_per_pass()
    return {"kind": "transforms", "title": "Permuted / rotated Fashion-MNIST: the task transform against the step "
            "(MLP, finetune)", "rounds": rounds, "steps_per_measurement": steps,
            "batch_size": loops["split"].dm.batch_size, "step_s": step_s, "ratios": ratios,
            "cache_build_s": build_s, "steps_per_epoch": task_steps,
            "target_rotated_vs_permuted": TARGET_ROTATED_VS_PERMUTED}


def render(result: dict) -> str:
    r, m = result["ratios"], result["machine"]
    met = r["rotated_vs_permuted_step"] <= result["target_rotated_vs_permuted"]
    lines = [f"### {result['title']}", "",
             f"{m['cpu']} · {m['cores']} cores ({m['torch_threads']} torch threads in the bench process) · torch {m['torch']} · "
             f"{result['date']} · load (1, 5, 15 min) {result['load']}", "",
             f"`{result['command']}`", "",
             "| measure | value | target | met |", "|---|---|---|---|",
             f"| rotated step ÷ permuted step (task cached) | {r['rotated_vs_permuted_step']:.2f} | "
             f"≤ {result['target_rotated_vs_permuted']} | {'yes' if met else '**no**'} |",
             f"| rotated step ÷ split step (task cached) | {r['rotated_vs_split_step']:.2f} | | |",
             f"| permuted step ÷ split step (task cached) | {r['permuted_vs_split_step']:.2f} | | |",
             f"| before: rotated ÷ permuted, both per batch | {r['rotated_per_batch_vs_permuted_per_batch_step']:.2f} |"
             " | |",
             f"| before: rotated per batch ÷ split | {r['rotated_per_batch_vs_split_step']:.2f} | | |", "",
             "Step (ms, median of " + f"{result['rounds']} interleaved rounds of {result['steps_per_measurement']} steps "
             f"of {result['batch_size']}): " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in result["step_s"].items())
             + ". Building a task's cache (once per task, "
             + f"{result['steps_per_epoch']} steps per epoch): "
             + ", ".join(f"{k} {v:.2f} s" for k, v in result["cache_build_s"].items()) + "."]
    return "\n".join(lines)
