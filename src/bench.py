"""How fast is the framework, against the floor of a bare PyTorch loop? Measured in one process, interleaved.

    python -m src.bench                      # MLP on Split Fashion-MNIST, and the default main job's wall time
    python -m src.bench --preset resnet      # reduced ResNet-18 on Split CIFAR-100 (generated data of the real size)
    python -m src.bench --preset mlp trainer=gpu dataset.data_on_device=true   # any override of `src.train`
    python -m src.bench --startup --baseline /work/main   # imports, first step and end of a job (src/bench_startup.py)

Every framework number goes through `src.train`'s own code path (`build_task_loop`: the composed config, the
DataModule, Lightning's Trainer with the default logger and callbacks). For each preset it measures:

1. a bare hand-written loop (batches cut from the same tensors, normalised on the device, forward, the scenario's
   cross-entropy, backward, optimizer step) — the floor;
2. one task's training through `Trainer.fit` for finetune, EWC, LwF, ER and DER++ (each method has finished task 0,
   so EWC pays its penalty, LwF its teacher, ER and DER++ replay from a buffer of 500 with a replayed batch as large
   as the current one) — samples/s; and the replay buffer's cost of adding one batch, full, at two sizes;
3. evaluation on every task (`TaskLoop.evaluate`) against a bare inference loop;
4. EWC's exact Fisher of one whole task, against a per-sample autograd loop on a subset (whose result it must match);
5. with `--main-job` (default for the MLP preset): the whole default main job in a subprocess, split into start-up,
   data loading, training, evaluation, Fisher and the rest, with its peak resident memory.

Apart from the presets: `--sweep` (a 4-job sweep, sequential against joblib: src/bench_sweep.py), `--transforms`
(the permuted/rotated task transform against the step: src/bench_transforms.py) and `--scale` (cost per task for
5, 20 and 50 tasks: src/bench_scale.py).

Timings alternate between the contenders round by round (the machine is shared: neighbouring measurements see the
same load) and ratios are medians of per-round ratios. Results: `--out` (JSON, one file per preset and machine) and
`experiments/benchmarks/RESULTS.md`, rebuilt from every JSON there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from src.bench_startup import RUN_IMPORTS, bench_startup, render_startup
from src.config import ROOT, compose_config
from src.continual.task_loop import peak_memory_mb

RESULTS_DIR = ROOT / "experiments" / "benchmarks" / "results"
TARGETS = {  # issue 7: the ratios the framework must meet, measured in one run
    "framework_vs_bare": {"mlp": 0.9, "resnet": 0.95},
    "ewc_vs_finetune_step": 1.3,
    "lwf_vs_finetune_step": 1.6,
    "er_vs_finetune_step": 2.0,  # issue 13: at replay batch = batch
    "derpp_vs_finetune_step": 2.0,
    "buffer_update_large_vs_small": 1.5,  # the cost of adding a batch must not grow with the buffer (×100 here)
    "fisher_vs_epoch": 1.0,
    "main_job_train_share": 0.7,
    "main_job_startup_s": 5.0,
}
PRESETS = {
    "mlp": {"title": "MLP 784-400-400 · Split Fashion-MNIST (5 tasks × 2 classes)",
            "overrides": ["dataset=split_fmnist", "model=mlp"], "main_job": True, "rounds": 5, "steps": 0,
            "reference_samples": 64, "fisher_samples": None},
    "resnet": {"title": "reduced ResNet-18 · Split CIFAR-100 (10 tasks × 10 classes, generated CIFAR-format data)",
               "overrides": ["dataset=split_cifar100", "model=resnet18_reduced"], "main_job": False, "rounds": 3,
               "steps": 10, "reference_samples": 16, "fisher_samples": 500},
}
METHODS = ("finetune", "ewc", "lwf", "er", "derpp")
BUFFER_SIZES = (500, 50_000)  # the replay buffer's update cost is measured at both sizes


# ---- timing ----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


# ---- the contenders ----------------------------------------------------------------------------------------------------
def build(method: str, overrides: list[str], run_dir: Path):
    from src.train import build_task_loop

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(f"method={method}", "save_checkpoints=false", *overrides, run_dir=run_dir)
    return build_task_loop(cfg, run_dir), cfg


def start_task(loop, task: int) -> None:
    """What the task loop does before training a task (without its evaluations, checkpoints and results)."""
    loop.dm.set_task(task, include_past=loop.module.regularizer.trains_on_past_tasks)
    loop.module.current_task = task
    loop.module.regularizer.on_task_start(task, loop.module, loop.dm)
    loop.dm.task_start_step = loop.trainer.global_step


def framework_epoch(loop, task: int, steps: int) -> int:
    """Train `task` once more through `Trainer.fit`, as the task loop does (one epoch, or `steps` steps)."""
    trainer = loop.trainer
    loop.steps_per_task = steps
    loop._set_limits(trainer.global_step, trainer.current_epoch)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # progress bar
        trainer.fit(loop.module, datamodule=loop.dm)
    trainer.fit_loop.restarting = False
    return trainer.global_step


class BareLoop:
    """The floor: the same network, optimizer and batches in a plain PyTorch loop."""

    def __init__(self, loop, cfg):
        from hydra.utils import instantiate

        module = loop.module
        self.device = module.device
        from src.models.speed import compile_copy

        # with model.compile=true the floor is compiled too (a deep copy drops the compiled forward)
        self.model = compile_copy(torch.nn.Sequential(copy.deepcopy(module.backbone), copy.deepcopy(module.head)))
        self.make_optimizer = instantiate(cfg.optimizer)
        self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.reset_optimizer = cfg.reset_optimizer  # as the framework: a fresh optimizer per task (= measurement)
        self.dm, self.scenario, self.task = loop.dm, module.scenario, module.current_task

    def batches(self):
        for batch in self.dm.train_dataloader():
            yield tuple(b.to(self.device, non_blocking=True) for b in batch)

    def epoch(self, steps: int) -> int:
        """One pass over the task (`steps` = 0) or exactly `steps` steps, over as many passes as that takes.
        One batch per step whatever `steps_per_batch` the framework runs with (the DataModule's setting decides
        both the loader's superbatches and their split after the transfer)."""
        framework_k, self.dm.steps_per_batch = self.dm.steps_per_batch, 1
        try:
            return self._epoch(steps)
        finally:
            self.dm.steps_per_batch = framework_k

    def _epoch(self, steps: int) -> int:
        self.model.train()
        if self.reset_optimizer:
            self.optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        done = 0
        while True:
            for x, y, t in self.batches():
                x, y, t = self.dm.on_after_batch_transfer((x, y, t), 0)
                view, targets = self.scenario.train_view(self.model(x), y, t, self.task)
                loss = F.cross_entropy(view, targets)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                done += 1
                if done == steps:
                    return done
            if steps <= 0:
                return done

    @torch.inference_mode()
    def evaluate(self) -> int:
        self.model.eval()
        n = 0
        for task, loader in enumerate(self.dm.eval_dataloaders("test")):
            for batch in loader:
                x, y, t = self.dm.on_after_batch_transfer(tuple(b.to(self.device) for b in batch), 0)
                view, targets = self.scenario.eval_view(self.model(x), y, t, task)
                (view.argmax(1) == targets).sum()
                n += len(y)
        return n


# ---- Fisher ------------------------------------------------------------------------------------------------------------
def per_sample_fisher(module, batches, task: int) -> dict[str, torch.Tensor]:
    """The exact diagonal Fisher by its definition: one sample at a time, one backward pass per class."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    was_training = module.training
    module.eval()
    for x, y, t in batches:
        for i in range(len(x)):
            logits = module(x[i : i + 1])
            view, _ = module.scenario.eval_view(logits, y[i : i + 1], t[i : i + 1], trained_up_to=task)
            log_p = F.log_softmax(view, dim=1)[0]
            p = log_p.exp().detach()
            for c in range(len(log_p)):
                grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
                for name, g in zip(params, grads, strict=True):
                    total[name] += p[c] * g * g
            count += 1
    module.train(was_training)
    return {n: v / count for n, v in total.items()}


def bench_fisher(ewc_loop, finetune_epoch_s: float, reference_samples: int, fisher_samples: int | None) -> dict:
    """EWC's Fisher of the task just trained, as `EWC.on_task_end` computes it, on `fisher_samples` samples (None:
    the whole task; else the time is scaled to the whole task, the cost being linear in the samples)."""
    from src.methods.fisher import fisher_diagonal

    module, dm, ewc = ewc_loop.module, ewc_loop.dm, ewc_loop.module.regularizer
    task, device = module.current_task, module.device

    def active_outputs(logits, batch):
        return module.scenario.eval_view(logits, batch[1], batch[2], trained_up_to=task)

    def fast(max_samples=None, kind=ewc.fisher_kind):
        batches = dm.task_batches(task, "train", batch_size=ewc.fisher_batch_size, device=device,
                                  max_samples=max_samples)
        return fisher_diagonal(module, batches, kind, active_outputs)

    n_task = len(dm.task_list[task].train_index)
    measured = {}
    seconds = timed(device, lambda: measured.update(n=fast(fisher_samples)[1]))
    if seconds < 2.0:  # cheap: take the best of two
        seconds = min(seconds, timed(device, lambda: fast(fisher_samples)))
    task_seconds = seconds * n_task / measured["n"]
    # `sample` (one drawn label per input) costs one backward pass whatever the number of classes; `exact` costs
    # C - 1 passes for C active classes (one for the 2-class heads of Split Fashion-MNIST)
    one_pass_s = timed(device, lambda: fast(fisher_samples, "sample")) * n_task / measured["n"]
    subset = list(dm.task_batches(task, "train", batch_size=reference_samples, device=device,
                                  max_samples=reference_samples))
    reference = {}
    reference_s = timed(device, lambda: reference.update(per_sample_fisher(module, subset, task)))
    fast_subset, n_subset = fast(reference_samples)
    error = max(float((fast_subset[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30))
                for k in reference)
    per_sample_loop_s = reference_s / n_subset * n_task
    return {
        "kind": ewc.fisher_kind, "samples": n_task, "measured_on": measured["n"], "seconds": task_seconds,
        "per_sample_loop_seconds_extrapolated": per_sample_loop_s,
        "per_sample_loop_measured_on": n_subset,
        "speedup_vs_per_sample_loop": per_sample_loop_s / task_seconds,
        "max_relative_error_vs_per_sample_loop": error,
        "fisher_vs_epoch": task_seconds / finetune_epoch_s,
        "sample_fisher_seconds": one_pass_s, "sample_fisher_vs_epoch": one_pass_s / finetune_epoch_s,
    }


# ---- the main job ------------------------------------------------------------------------------------------------------
def bench_main_job(overrides: list[str], tmp: Path) -> dict:
    """`python -m src.train` as a user runs it, split by the run's own clocks (results.json `timing_s`)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN_IMPORTS], cwd=ROOT, check=True, env=env)
    imports = time.perf_counter() - start
    run_dir = tmp / "main_job"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    timing, peak_rss_mb = results["timing_s"], results["peak_memory_mb"]["rss"]
    parts = {"startup (before the task loop)": timing["startup"], "train": timing["train"], "fisher (task end)": timing["task_end"],
             "evaluation": timing["eval"], "checkpoints": timing["checkpoint"]}
    parts["other (logging, plots, results, exit)"] = wall - sum(parts.values())
    return {"end_after_results_s": wall - timing["results_written"],
        "command": "python -m src.train " + " ".join(overrides), "wall_s": wall, "parts_s": parts,
        "startup_detail_s": {"python + imports (measured apart)": imports,
                             "data loading left after the imports": timing["data"]},
        "train_share": timing["train"] / wall, "first_step_s": timing["first_step"], "peak_rss_mb": peak_rss_mb,
        "steps": sum(results["steps_per_task"]),
    }


# ---- generated CIFAR-100 ------------------------------------------------------------------------------------------------
def write_fake_cifar100(root: Path) -> Path:
    """`cifar-100-python/{train,test,meta}` of the real size (50,000 + 10,000 random images) in the official
    pickle format, so the real loader parses them."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", 500), ("test", 100)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        batch = {"fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class_{i}" for i in range(100)]}, protocol=2))
    return root


def bench_buffer_update(er_loop, rounds: int, adds: int = 20) -> dict:
    """Seconds to add one training batch to a full replay buffer (reservoir), at each of BUFFER_SIZES. Both buffers
    have seen twice their size, so a sample replaces a stored one with the same probability (size / seen = 1/2) and
    both do the same number of writes: what is left to differ is what the buffer's size costs."""
    from src.methods.replay_buffer import ReplayBuffer

    dm = er_loop.dm
    device = er_loop.module.device
    batch = next(iter(dm.train_dataloader()))
    images, labels, task_ids = (t.to(device) for t in batch)
    buffers = {}
    for size in BUFFER_SIZES:
        buffers[size] = ReplayBuffer(size, seed=0)
        while buffers[size].seen < 2 * size:  # full, and then as much again
            buffers[size].add(images, labels, task_ids)
    seconds = {size: [] for size in BUFFER_SIZES}
    for _ in range(rounds):
        for size, buffer in buffers.items():
            seconds[size].append(timed(device, lambda b=buffer: [b.add(images, labels, task_ids) for _ in range(adds)])
                                 / adds)
    small, large = BUFFER_SIZES
    return {"batch_size": len(labels), "seconds_per_add": {str(k): statistics.median(v) for k, v in seconds.items()},
            "large_vs_small": median_ratio(seconds[large], seconds[small])}


# ---- one preset --------------------------------------------------------------------------------------------------------
def bench_preset(name: str, extra: list[str], rounds: int, steps: int, main_job: bool, reference_samples: int,
                 fisher_samples: int | None, tmp: Path) -> dict:
    preset = PRESETS[name]
    overrides = [*preset["overrides"], *extra]
    if fisher_samples is not None:  # EWC's own Fisher at the end of task 0 too: its size does not change a step's cost
        overrides.append(f"method.fisher_samples={fisher_samples}")
    if name == "resnet" and not any(o.startswith("paths.data_dir=") for o in extra):
        overrides.append(f"paths.data_dir={write_fake_cifar100(tmp / 'data')}")
    loops = {}
    for method in METHODS:  # each method finishes task 0 as the task loop does, then trains task 1
        loop, cfg = build(method, [o for o in overrides if method == "ewc" or "fisher_samples" not in o], tmp / method)
        loop.module.trained_up_to = -1
        start_task(loop, 0)  # task 0 only has to leave each method's state (teacher, Fisher) behind
        framework_epoch(loop, 0, steps)
        loop.module.regularizer.on_task_end(0, loop.module, loop.dm)
        loop.module.trained_up_to = 0
        start_task(loop, 1)
        loops[method] = loop
    bare = BareLoop(loops["finetune"], cfg)
    device = bare.device
    samples_per_step = loops["finetune"].dm.batch_size
    times = {key: [] for key in ("bare", *METHODS)}
    n_steps = 0
    for _ in range(rounds):
        times["bare"].append(timed(device, lambda: bare.epoch(steps)))
        for method, loop in loops.items():
            before = loop.trainer.global_step
            times[method].append(timed(device, lambda loop=loop: framework_epoch(loop, 1, steps)))
            n_steps = loop.trainer.global_step - before
    bare_steps = bare.epoch(steps)
    assert bare_steps == n_steps, f"the bare loop ran {bare_steps} steps, the framework {n_steps}"
    eval_times = {"bare": [], "framework": []}
    for _ in range(min(rounds, 3)):
        eval_times["bare"].append(timed(device, lambda: bare.evaluate()))
        eval_times["framework"].append(timed(device, lambda: loops["finetune"].evaluate("test")))
    n_eval = bare.evaluate()

    task_samples = len(loops["finetune"].dm.train_dataloader().index)
    n_samples = task_samples if steps == 0 else min(task_samples, n_steps * samples_per_step)

    def throughput(key):
        return n_samples / statistics.median(times[key])

    result = {
        "preset": name, "title": preset["title"], "overrides": overrides, "rounds": rounds,
        "steps_per_measurement": n_steps, "batch_size": samples_per_step,
        "train_samples_per_s": {key: throughput(key) for key in times},
        "train_seconds": times,
        "ratios": {
            "framework_vs_bare": median_ratio(times["bare"], times["finetune"]),
            "ewc_vs_finetune_step": median_ratio(times["ewc"], times["finetune"]),
            "lwf_vs_finetune_step": median_ratio(times["lwf"], times["finetune"]),
            "er_vs_finetune_step": median_ratio(times["er"], times["finetune"]),
            "derpp_vs_finetune_step": median_ratio(times["derpp"], times["finetune"]),
            "eval_framework_vs_bare": median_ratio(eval_times["bare"], eval_times["framework"]),
        },
        "eval_samples_per_s": {k: n_eval / statistics.median(v) for k, v in eval_times.items()},
    }
    result["buffer_update"] = bench_buffer_update(loops["er"], rounds)
    result["ratios"]["buffer_update_large_vs_small"] = result["buffer_update"]["large_vs_small"]
    epoch_s = statistics.median(times["finetune"]) * (loops["ewc"].dm.train_dataloader().steps_per_pass() / n_steps)
    result["fisher"] = bench_fisher(loops["ewc"], epoch_s, reference_samples, fisher_samples)
    result["ratios"]["fisher_vs_epoch"] = result["fisher"]["fisher_vs_epoch"]
    if main_job:
        result["main_job"] = bench_main_job(extra, tmp)
        result["ratios"]["main_job_train_share"] = result["main_job"]["train_share"]
    peak = peak_memory_mb()
    result["peak_rss_mb_bench_process"], result["gpu_peak_memory_mb"] = peak["rss"], peak["gpu"]
    return result


# ---- reporting ---------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def verdicts(result: dict) -> list[tuple[str, float, str, bool]]:
    r, out = result["ratios"], []
    floor = TARGETS["framework_vs_bare"][result["preset"]]
    out.append(("framework finetune ÷ bare loop (throughput)", r["framework_vs_bare"], f"≥ {floor}",
                r["framework_vs_bare"] >= floor))
    out.append(("EWC step ÷ finetune step", r["ewc_vs_finetune_step"], f"≤ {TARGETS['ewc_vs_finetune_step']}",
                r["ewc_vs_finetune_step"] <= TARGETS["ewc_vs_finetune_step"]))
    out.append(("LwF step ÷ finetune step", r["lwf_vs_finetune_step"], f"≤ {TARGETS['lwf_vs_finetune_step']}",
                r["lwf_vs_finetune_step"] <= TARGETS["lwf_vs_finetune_step"]))
    for method in ("er", "derpp"):
        key = f"{method}_vs_finetune_step"
        if key in r:
            out.append((f"{'ER' if method == 'er' else 'DER++'} step ÷ finetune step (replay batch = batch)", r[key],
                        f"≤ {TARGETS[key]}", r[key] <= TARGETS[key]))
    if "buffer_update_large_vs_small" in r:
        small, large = BUFFER_SIZES
        out.append((f"buffer update, size {large:,} ÷ size {small:,}", r["buffer_update_large_vs_small"],
                    f"≤ {TARGETS['buffer_update_large_vs_small']}",
                    r["buffer_update_large_vs_small"] <= TARGETS["buffer_update_large_vs_small"]))
    out.append((f"{result['fisher']['kind']} Fisher of a task ÷ one training epoch", r["fisher_vs_epoch"],
                f"≤ {TARGETS['fisher_vs_epoch']}", r["fisher_vs_epoch"] <= TARGETS["fisher_vs_epoch"]))
    if "main_job" in result:
        job = result["main_job"]
        out.append(("main job: share of wall time in training", job["train_share"],
                    f"≥ {TARGETS['main_job_train_share']}", job["train_share"] >= TARGETS["main_job_train_share"]))
        out.append(("main job: start-up to the first training step (s)", job["first_step_s"],
                    f"< {TARGETS['main_job_startup_s']}", job["first_step_s"] < TARGETS["main_job_startup_s"]))
    return out


def render(result: dict) -> str:
    if result["preset"] == "startup":
        return render_startup(result)
    m = result["machine"]
    lines = [f"### {result['title']}", "",
             f"{m['cpu']} · {m['cores']} cores ({m['torch_threads']} torch threads)"
             + (f" · {m['gpu']}" if m["gpu"] else " · no GPU") + f" · torch {m['torch']} · {result['date']}", "",
             f"`{result['command']}`", "",
             "| measure | value | target | met |", "|---|---|---|---|"]
    for label, value, target, met in verdicts(result):
        lines.append(f"| {label} | {value:.2f} | {target} | {'yes' if met else '**no**'} |")
    sps = result["train_samples_per_s"]
    lines += ["", f"Training, {result['steps_per_measurement']} steps of {result['batch_size']} per measurement, "
              f"{result['rounds']} interleaved rounds (samples/s, medians): "
              + ", ".join(f"{k} {v:,.0f}" for k, v in sps.items()) + ".",
              f"Evaluation on every task (samples/s): framework {result['eval_samples_per_s']['framework']:,.0f}, "
              f"bare {result['eval_samples_per_s']['bare']:,.0f} (ratio {result['ratios']['eval_framework_vs_bare']:.2f}).",
              ]
    if "buffer_update" in result:
        per_add = result["buffer_update"]["seconds_per_add"]
        lines.append("Replay buffer, one add of a batch of " + f"{result['buffer_update']['batch_size']} to a full buffer: "
                     + ", ".join(f"size {int(k):,}: {v * 1e6:.0f} µs" for k, v in per_add.items()) + ".")
    f = result["fisher"]
    scaled = f" (measured on {f['measured_on']:,}, scaled)" if f["measured_on"] != f["samples"] else ""
    lines.append(f"Fisher ({f['kind']}) of one task, {f['samples']:,} samples{scaled}: {f['seconds']:.2f} s; a per-sample "
                 f"autograd loop would take {f['per_sample_loop_seconds_extrapolated']:.1f} s (measured on "
                 f"{f['per_sample_loop_measured_on']} samples, ×{f['speedup_vs_per_sample_loop']:.1f}; the two agree "
                 f"to a relative {f['max_relative_error_vs_per_sample_loop']:.1e}). One pass (`fisher=sample`): "
                 f"{f['sample_fisher_seconds']:.2f} s, {f['sample_fisher_vs_epoch']:.2f} epochs.")
    if "main_job" in result:
        job = result["main_job"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in job["parts_s"].items())
        detail = ", ".join(f"{k} {v:.2f}" for k, v in job["startup_detail_s"].items())
        lines.append(f"Main job `{job['command'].strip()}`: {job['wall_s']:.2f} s wall for {job['steps']} steps "
                     f"— {parts} (start-up includes {detail}); peak RSS {job['peak_rss_mb']:.0f} MB"
                     + (f"; the process ended {job['end_after_results_s']:.2f} s after its final results.json."
                        if "end_after_results_s" in job else "."))
    gpu = result.get("gpu_peak_memory_mb")
    lines.append(f"Peak RSS of the benchmark process: {result['peak_rss_mb_bench_process']:.0f} MB"
                 + (f"; GPU memory allocated at peak: {gpu:.0f} MB." if gpu else "."))
    return "\n".join(lines)


def render_any(result: dict) -> str:
    """A preset's section, or that of `--sweep`, `--transforms`, `--scale` (their own files render them)."""
    kind = result.get("kind")
    if kind is None:
        return render(result)
    import importlib

    return importlib.import_module(f"src.bench_{kind}").render(result)


def run_other(args, argv) -> list[dict]:
    """`--sweep`, `--transforms`, `--scale`: each measured by its own file, written like a preset's result."""
    from src.continual.results import write_json_atomic

    results = []
    load_before = _load()
    for kind, wanted in (("transforms", args.transforms), ("sweep", args.sweep), ("scale", args.scale)):
        if not wanted:
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
            if kind == "sweep":
                from src.bench_sweep import bench_sweep

                result = bench_sweep(args.overrides, args.steps or 20, Path(tmp))
            elif kind == "transforms":
                from src.bench_transforms import bench_transforms

                result = bench_transforms(args.overrides, args.rounds or 5, args.steps or 40, Path(tmp))
            else:
                from src.bench_scale import bench_scale

                result = bench_scale(args.overrides, args.steps or 20, 500, Path(tmp))
        result.update(machine=machine(), date=time.strftime("%Y-%m-%d"), load=f"{load_before} → {_load()}",
                      command="python -m src.bench " + " ".join(sys.argv[1:] if argv is None else argv))
        host = "gpu-" + result["machine"]["gpu"].split()[-1] if result["machine"]["gpu"] else "cpu"
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / f"{kind}-{host}-{result['machine']['cores']}cores.json", result)
        print(render_any(result), flush=True)
        results.append(result)
        load_before = _load()
    write_results_md(args.out, args.results_md)
    return results


def _load() -> str:
    """The machine's load averages (1, 5, 15 min) when the measurement ended: the machine may be shared."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def write_results_md(results_dir: Path, path: Path) -> None:
    from src.continual.results import write_text_atomic

    sections = [render_any(json.loads(p.read_text())) for p in sorted(results_dir.glob("*.json"))]
    header = ("# Benchmarks\n\nWritten by `python -m src.bench` from the JSON files in `results/` (one per preset and "
              "machine); rerun it to refresh. Ratios are medians of per-round ratios measured in one process. What the "
              "numbers mean and where the time goes: [docs/speed.md](../../docs/speed.md). A GPU run writes its own "
              "section here (`python -m src.bench --preset resnet trainer=gpu`); earlier H100 smoke runs are in "
              "[experiments/gpu](../gpu/README.md).\n\n")
    write_text_atomic(path, header + "\n\n".join(sections) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="mlp")
    parser.add_argument("--rounds", type=int, help="interleaved measurements per contender (default: the preset's)")
    parser.add_argument("--steps", type=int, help="steps per measurement (0: one epoch of the task; default: the "
                        "preset's)")
    parser.add_argument("--reference-samples", type=int, help="samples of the per-sample Fisher loop")
    parser.add_argument("--fisher-samples", type=int, help="samples the Fisher is timed on (scaled to the task; "
                        "default: the preset's, the whole task for the MLP)")
    parser.add_argument("--main-job", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--sweep", action="store_true", help="a 4-job sweep: sequential vs joblib (src/bench_sweep.py)")
    parser.add_argument("--transforms", action="store_true", help="permuted/rotated transform vs the step "
                        "(src/bench_transforms.py)")
    parser.add_argument("--scale", action="store_true", help="cost per task for 5, 20, 50 tasks (src/bench_scale.py)")
    parser.add_argument("--startup", action="store_true", help="only the fixed costs of a job: imports, first step, "
                        "end (src/bench_startup.py)")
    parser.add_argument("--baseline", type=Path, help="with --startup: another checkout whose main job alternates "
                        "with this one's (before/after under the same load)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON results")
    parser.add_argument("--results-md", type=Path, default=RESULTS_DIR.parent / "RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="overrides of `python -m src.train`, e.g. trainer=gpu")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.sweep or args.transforms or args.scale:
        return run_other(args, argv)
    results = []
    for name in ["startup"] if args.startup else PRESETS if args.preset == "all" else [args.preset]:
        preset = PRESETS.get(name, {})
        main_job = preset.get("main_job") if args.main_job == "auto" else args.main_job == "yes"

        def option(key, preset=preset):
            value = getattr(args, key)
            return preset[key] if value is None else value

        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            if name == "startup":  # the main job's own overrides only (no preset)
                result = bench_startup(args.overrides, args.rounds or 3, args.baseline, Path(tmp))
            else:
                result = bench_preset(name, args.overrides, option("rounds"), option("steps"), main_job,
                                      option("reference_samples"), option("fisher_samples"), Path(tmp))
        result["machine"] = machine()
        result["date"] = time.strftime("%Y-%m-%d")
        result["command"] = "python -m src.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        host = "gpu-" + result["machine"]["gpu"].split()[-1] if result["machine"]["gpu"] else "cpu"
        args.out.mkdir(parents=True, exist_ok=True)
        variant = "".join(c if c.isalnum() or c in "=." else "_" for c in "_".join(args.overrides))[:80]
        out = args.out / f"{name}-{host}-{result['machine']['cores']}cores{'-' + variant if variant else ''}.json"
        from src.continual.results import write_json_atomic

        write_json_atomic(out, result)
        print(render(result), flush=True)
        results.append(result)
    write_results_md(args.out, args.results_md)
    return results


if __name__ == "__main__":
    main()
