"""Training-step cost of LwF against finetune, measured in one process, interleaved.

    python experiments/benchmarks/bench_lwf.py [hydra overrides, e.g. model=convnet scenario=class]

Both methods are built from the real config (same model, same initial weights, same data, same batch) and trained
on task 2 of Split Fashion-MNIST, with LwF holding a teacher from task 1, so every LwF step pays for the teacher's
forward pass and the distillation term. Two timings, both alternating between the methods (the machine is shared:
neighbouring measurements see the same load), reported as the ratio of the medians and as the median of the ratios
of neighbouring measurements:

- `module step`: the module's own code path without Lightning's loop: `module(x)`, the scenario's cross-entropy,
  `regularizer.loss`, backward, Adam step — the cost of the method itself; single steps alternate;
- `lightning step`: one `Trainer.fit` step as training runs it (batch on device → `training_step` with logging →
  backward → Adam step), timed by a callback from `on_train_batch_start` to `on_train_batch_end`; short fits of
  a few steps alternate.
On a GPU (`trainer=gpu dataset.data_on_device=true`) the timers synchronise the device.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers import build_loop  # noqa: E402  (the in-process builder of the real config)

warnings.filterwarnings("ignore")
MODULE_STEPS, ROUNDS, BLOCK = 300, 60, 5


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sync(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(module.device)
        self.times.append(time.perf_counter() - self._start)


def build(method: str, tmp: Path, overrides: list[str]):
    loop = build_loop(tmp / method, f"method={method}", "+trainer.enable_progress_bar=false", *overrides)
    loop.dm.set_task(1)
    loop.module.current_task = 1
    loop.module.regularizer.on_task_end(0, loop.module, loop.dm)  # LwF: a teacher (finetune: nothing)
    loop.trainer.callbacks.append(StepTimer())
    return loop


def lightning_block(loop, steps: int) -> None:
    fit_loop = loop.trainer.fit_loop
    fit_loop.max_epochs = -1
    fit_loop.epoch_loop.max_steps = loop.trainer.global_step + steps
    loop.trainer.fit(loop.module, datamodule=loop.dm)


def module_block(module, optimizer, batches, steps: int) -> list[float]:
    times = []
    module.train()
    for i in range(steps):
        x, labels, task_ids = batches[i % len(batches)]
        sync(x.device)
        start = time.perf_counter()
        logits = module(x)
        view, targets = module.scenario.train_view(logits, labels, task_ids, module.current_task)
        terms = module.regularizer.loss(module, (x, labels, task_ids), logits, F.cross_entropy(view, targets))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        sync(x.device)
        times.append(time.perf_counter() - start)
    return times


def main(overrides: list[str]) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        loops = {m: build(m, Path(tmp), overrides) for m in ("finetune", "lwf")}
        timers = {m: loop.trainer.callbacks[-1] for m, loop in loops.items()}
        same_init = all(torch.equal(a, b) for a, b in zip(loops["finetune"].module.parameters(),
                                                          loops["lwf"].module.parameters(), strict=True))
        device = loops["lwf"].trainer.strategy.root_device

        # 1. the module's code path, outside Lightning: alternate single steps, so each pair shares the load
        dm = loops["finetune"].dm
        batches = list(dm.task_batches(1, "train", batch_size=dm.batch_size, device=device))[:20]
        optimizers = {}
        for m, loop in loops.items():
            loop.module.to(device)
            optimizers[m] = loop.module.optimizer_factory(list(loop.module.parameters()))
            module_block(loop.module, optimizers[m], batches, 10)  # warm-up: allocator, caches, lazy teacher move
        module_times = {m: [] for m in loops}
        for i in range(MODULE_STEPS):
            for m in (("finetune", "lwf") if i % 2 == 0 else ("lwf", "finetune")):
                module_times[m] += module_block(loops[m].module, optimizers[m], batches[i % len(batches):], 1)
        module_pairs = [b / a for a, b in zip(module_times["finetune"], module_times["lwf"], strict=True)]

        # 2. full Lightning training steps: alternate short fits, compare the medians of neighbouring blocks
        for m, loop in loops.items():
            lightning_block(loop, 10)  # warm-up
            timers[m].times.clear()
        block_ratios = []
        for r in range(ROUNDS):
            block = {}
            for m in (("finetune", "lwf") if r % 2 == 0 else ("lwf", "finetune")):
                lightning_block(loops[m], BLOCK)
                block[m] = statistics.median(timers[m].times[-BLOCK:])
            block_ratios.append(block["lwf"] / block["finetune"])
        lightning_times = {m: timer.times for m, timer in timers.items()}

    cfg = loops["lwf"].results["config"]
    print(f"model={cfg['model']['_target_'].rsplit('.', 1)[-1]} scenario={cfg['scenario']['_target_'].rsplit('.', 1)[-1]}"
          f" batch={cfg['dataset']['batch_size']} device={device} threads={torch.get_num_threads()} same_init={same_init}")
    for name, times, paired, what in (("module step", module_times, module_pairs, "step pairs"),
                                      ("lightning step", lightning_times, block_ratios, f"{BLOCK}-step blocks")):
        ft, lwf = statistics.median(times["finetune"]), statistics.median(times["lwf"])
        print(f"{name:15s} finetune {1e3 * ft:7.3f} ms   lwf {1e3 * lwf:7.3f} ms   ratio of medians {lwf / ft:.3f}x"
              f"   median paired ratio {statistics.median(paired):.3f}x   ({len(times['lwf'])} steps each, "
              f"{len(paired)} {what})")


if __name__ == "__main__":
    main(sys.argv[1:])
