"""What EWC costs: the Fisher over one task's training set, and the penalty per training step.

    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_fisher.py                 # MLP and conv net, writes RESULTS.md
    OMP_NUM_THREADS=1 python experiments/benchmarks/bench_fisher.py --models mlp --no-write [hydra overrides]

For each model (`model=mlp`, `model=convnet`, built from the real config, task-incremental heads) on task 0 of Split
Fashion-MNIST with `dataset.val_fraction=0` (12,000 training images), in one process:

- `epoch`: one training epoch of the task (batch 128, Adam, finetune), twice: the bare loop of the module's own step
  (forward, the scenario's cross-entropy, `regularizer.loss`, backward, Adam step) and `Trainer.fit` as the task loop
  runs it (Lightning's loop, `training_step` with its logging);
- the Fisher of `src/methods/fisher.py` for `empirical`, `sample` and `exact` (2 classes: the task's own head), and
  `exact` over all 10 outputs (the class-incremental view at the end of the sequence), all 12,000 images, batch 500;
- the references, on the first `--ref-samples` images and scaled to 12,000 (marked ×): a per-sample Python loop
  (one forward + backward per image, squared `.grad`) and `torch.func` `vmap(grad)` (chunks of 500), `empirical`;
- EWC vs finetune training cost, EWC holding the Fishers of 4 tasks (separate mode), on task 4: the median time of
  one module step (alternating blocks of steps between the two, so the machine's noise hits both alike), and one
  epoch through Lightning (alternating).

The machine is shared, so every number is the best of `--repeats` runs and the ratios are the point: targets (issue 8)
`empirical`/`sample` ≤ 1.5 epochs, `exact` ≤ 1 epoch per class, the penalty < 30 % per step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.methods.fisher import fisher_diagonal  # noqa: E402
from tests.helpers import build_loop  # noqa: E402  (the in-process builder of the real config)

warnings.filterwarnings("ignore")
MODELS = {"mlp": ["model=mlp"], "conv": ["model=convnet"]}


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_steps(module, optimizer, batches) -> list[float]:
    module.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        x, labels, task_ids = batch
        logits = module(x)
        view, targets = module.scenario.train_view(logits, labels, task_ids, module.current_task)
        terms = module.regularizer.loss(module, batch, logits, F.cross_entropy(view, targets))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def lightning_epoch(loop) -> None:
    """One epoch of the datamodule's current task as the task loop trains it: `Trainer.fit`, `training_step`."""
    trainer = loop.trainer
    trainer.fit_loop.max_epochs = trainer.current_epoch + 1
    trainer.fit_loop.epoch_loop.max_steps = -1
    trainer.fit(loop.module, datamodule=loop.dm)


def per_sample_loop(module, batches, view) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    module.eval()
    for batch in batches:
        for i in range(len(batch[0])):
            one = tuple(t[i : i + 1] for t in batch)
            outputs, targets = view(module(one[0]), one)
            module.zero_grad(set_to_none=True)
            F.cross_entropy(outputs, targets).backward()
            for s, p in zip(sums, params, strict=True):
                s += p.grad**2
    module.train()


def vmap_grad(module, batches, view) -> None:
    from torch.func import functional_call, grad, vmap

    module.eval()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def loss(values, x, y, t):
        outputs, targets = view(functional_call(module, values, (x[None],)), (x[None], y[None], t[None]))
        return F.cross_entropy(outputs, targets)

    sums = {n: torch.zeros_like(v) for n, v in values.items()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    for x, y, t in batches:
        grads = per_sample(values, x, y, t)
        for n in names:
            sums[n] += grads[n].square().sum(0)
    module.train()


def bench_model(name: str, args, tmp: Path) -> dict:
    overrides = [*MODELS[name], "dataset.val_fraction=0", "+trainer.enable_progress_bar=false", *args.overrides]
    loop = build_loop(tmp / name, *overrides, "method=ewc", "method.mode=separate")
    finetune_loop = build_loop(tmp / f"{name}_ft", *overrides, "method=finetune")
    module, dm = loop.module, loop.dm
    finetune = finetune_loop.module
    finetune.load_state_dict(module.state_dict())
    dm.set_task(0)
    train = list(dm.train_dataloader())
    train = [dm.on_after_batch_transfer(b, 0) for b in train]
    n = sum(len(b[0]) for b in train)
    fisher_batches = list(dm.task_batches(0, "train", batch_size=500))
    ref_batches = list(dm.task_batches(0, "train", batch_size=500, max_samples=args.ref_samples))
    n_ref = sum(len(b[0]) for b in ref_batches)
    scale = n / n_ref

    def task_view(logits, batch):
        return module.scenario.eval_view(logits, batch[1], batch[2], trained_up_to=0)

    def all_outputs(logits, batch):  # the class-incremental view after the last task: 10 active outputs
        return logits, batch[2] * dm.classes_per_task + batch[1]

    optimizer = finetune.optimizer_factory(list(finetune.parameters()))
    train_steps(finetune, optimizer, train[:5])  # warm-up
    out = {"model": name, "n": n, "n_ref": n_ref, "params": sum(p.numel() for p in module.parameters())}
    out["epoch"] = best_of(args.repeats, lambda: train_steps(finetune, optimizer, train))

    finetune_loop.dm.set_task(0)
    out["lightning_epoch"] = best_of(args.repeats, lambda: lightning_epoch(finetune_loop))
    for kind in ("empirical", "sample", "exact"):
        g = torch.Generator().manual_seed(0)
        out[kind] = best_of(args.repeats, lambda kind=kind, g=g: fisher_diagonal(module, fisher_batches, kind,
                                                                               task_view, generator=g))
    out["exact10"] = best_of(args.repeats, lambda: fisher_diagonal(module, fisher_batches, "exact", all_outputs))
    out["loop"] = scale * best_of(1, lambda: per_sample_loop(module, ref_batches, task_view))
    out["vmap"] = scale * best_of(1, lambda: vmap_grad(module, ref_batches, task_view))

    # the penalty per step: EWC with 4 tasks' Fishers (separate mode) vs finetune, same weights, same batches
    for task in range(4):
        module.regularizer.on_task_end(task, module, dm)
    module.current_task = finetune.current_task = 4
    finetune.load_state_dict(module.state_dict())
    steps = [b for b in train[: args.step_batches]]
    steps = [(x, y, torch.full_like(t, 4)) for x, y, t in steps]
    optimizers = {"ewc": module.optimizer_factory(list(module.parameters())), "finetune": optimizer}
    modules = {"ewc": module, "finetune": finetune}
    times = {"ewc": [], "finetune": []}
    for m in modules:
        train_steps(modules[m], optimizers[m], steps[:5])
    for r in range(args.rounds):
        for m in (("ewc", "finetune") if r % 2 else ("finetune", "ewc")):
            times[m] += train_steps(modules[m], optimizers[m], steps)
    out["step_finetune"] = statistics.median(times["finetune"])
    out["step_ewc"] = statistics.median(times["ewc"])
    # and a whole epoch of task 4 through Lightning, as the task loop trains it, alternating
    loop.dm.set_task(4)
    finetune_loop.dm.set_task(4)
    epochs = {"ewc": [], "finetune": []}
    for r in range(args.repeats):
        for m, lp in ((("ewc", loop), ("finetune", finetune_loop)) if r % 2 else
                      (("finetune", finetune_loop), ("ewc", loop))):
            epochs[m].append(best_of(1, lambda lp=lp: lightning_epoch(lp)))
    out["epoch_ewc"], out["epoch_finetune"] = min(epochs["ewc"]), min(epochs["finetune"])
    penalty_check = module.regularizer.penalty(module).item()
    out["penalty_after"] = penalty_check
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.machine()


def report(rows: list[dict], args) -> str:
    lines = [
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python experiments/benchmarks/bench_fisher.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
        f"Machine: {_cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); best of {args.repeats} for each time; one run, so the ratios compare "
        "like with like.",
        "",
        "| model | params | images | epoch (bare loop) | epoch (Lightning) | empirical | sample | exact (2 cl.) "
        "| exact (10 cl.) | per-sample loop × | vmap(grad) × |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['n']:,} | {r['epoch']:.2f} s | {r['lightning_epoch']:.2f} s "
            f"| {r['empirical']:.2f} s "
            f"| {r['sample']:.2f} s | {r['exact']:.2f} s | {r['exact10']:.2f} s | {r['loop']:.1f} s | {r['vmap']:.1f} s |"
        )
    lines += ["", "Ratios, Fisher time over one training epoch of the same task, as *bare loop / Lightning* (lower is "
              "better; the targets of issue 8 in brackets):", "",
              "| model | empirical [≤ 1.5] | sample [≤ 1.5] | exact, 2 classes [≤ 2] | exact, 10 classes [≤ 10] "
              "| loop / empirical | vmap / empirical | EWC / finetune: module step, Lightning epoch [< 1.3] |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(key, r=r):
            return f"{r[key] / r['epoch']:.2f} / {r[key] / r['lightning_epoch']:.2f}"

        lines.append(
            f"| {r['model']} | {ratio('empirical')} | {ratio('sample')} | {ratio('exact')} | {ratio('exact10')} "
            f"| {r['loop'] / r['empirical']:.0f}× | {r['vmap'] / r['empirical']:.0f}× "
            f"| {r['step_ewc'] / r['step_finetune']:.2f} ({1e3 * r['step_ewc']:.2f} vs {1e3 * r['step_finetune']:.2f} ms), "
            f"{r['epoch_ewc'] / r['epoch_finetune']:.2f} ({r['epoch_ewc']:.2f} vs {r['epoch_finetune']:.2f} s) |"
        )
    lines += ["", f"× = measured on the first {rows[0]['n_ref']} images and scaled to {rows[0]['n']:,}. "
              f"Step times: medians over {args.rounds} alternating blocks of {args.step_batches} steps, batch 128, "
              "EWC holding 4 tasks' Fishers (separate mode); Lightning epochs: best of "
              f"{args.repeats}, alternating."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--step-batches", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "experiments" / "ewc" / "RESULTS.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both models, e.g. dataset.source.system_dir=…")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.models:
            rows.append(bench_model(name, args, Path(tmp)))
            print(rows[-1], flush=True)
    text = report(rows, args)
    print(text)
    if not args.no_write:
        path = Path(args.output)
        path.write_text("# Fisher and penalty cost (experiments/benchmarks/bench_fisher.py)\n\n" + text + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
