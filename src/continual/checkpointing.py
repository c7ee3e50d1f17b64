"""Checkpoints that let a killed run continue exactly: atomic files, RNG states, and saves every N steps.

The task loop's own progress (which task, which phase, the results so far) travels in the checkpoint through the
module's `loop_state`; Lightning adds the model, optimizer and its loop counters; the regularizer adds its state.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch

from src.continual.preemption import PREEMPTION, Interrupted, keep_lightning_off_sigterm


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(trainer: L.Trainer, path: Path) -> None:
    """`trainer.save_checkpoint` under a temporary name, then a rename: a crash never leaves half a checkpoint.
    Collective under DDP (every rank calls it; rank 0 writes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("checkpoint")


def link_atomic(target: Path, link: Path) -> None:
    """Make `link` a hard link to `target` (e.g. last.ckpt → task_3.ckpt) without a moment where it is missing."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    os.link(target, tmp)
    os.replace(tmp, link)


class StepCheckpoint(L.Callback):
    """Save `last.ckpt` every `every_n_steps` optimizer steps, in the middle of tasks: after the batch whose steps
    reach or cross a multiple of N (a batch takes several steps with steps_per_batch > 1)."""

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = Path(path), every_n_steps
        self._step_before = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Not on an epoch's last batch: Lightning (2.6) restores such a checkpoint one epoch too far on, so a
        # resumed run would skip an epoch. The previous checkpoint (or the next one) serves instead.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        before = trainer.global_step - 1 if self._step_before is None else self._step_before
        if trainer.global_step // self.every_n_steps > before // self.every_n_steps:
            save_mid_task(trainer, pl_module, self.path)


def save_mid_task(trainer: L.Trainer, pl_module, path: Path | None) -> None:
    """A checkpoint from which `fit(ckpt_path=…)` continues the task: taken after an optimizer step (from
    `on_train_batch_end`, but not an epoch's last batch) or at an epoch's end (`on_train_epoch_end`).
    `path=None`: checkpoints are off."""
    if path is not None:
        pl_module.loop_state["phase"] = "training"
        save_atomic(trainer, path)


class RestoreRngAtTrainStart(L.Callback):
    """Restore a mid-task checkpoint's RNG states once its `fit` starts training. Not before `fit`: under DDP
    Lightning seeds every process again as each fit sets up (`DDPStrategy.setup_distributed` → `reset_seed`), which
    replaced them, so a resumed DDP run drew other dropout masks than the run it continues."""

    def __init__(self):
        self.state: dict | None = None

    def on_train_start(self, trainer, pl_module):
        if self.state is not None:
            restore_rng(self.state)
            self.state = None


class StopOnSignal(L.Callback):
    """Stop a task at the first safe point after SIGTERM/SIGINT/SIGUSR1 (src/continual/preemption.py): checkpoint
    the step just taken to `path` and raise `Interrupted`. Under DDP the ranks agree on the step (one all-reduce of
    the signal per batch; nothing at all in a single process)."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)

    def _stop_if_signalled(self, trainer, pl_module) -> None:
        signum = PREEMPTION.agreed(trainer)
        if signum is not None:
            save_mid_task(trainer, pl_module, self.path)
            raise Interrupted(signum)

    def on_train_start(self, trainer, pl_module):  # after Lightning has installed its signal handlers
        keep_lightning_off_sigterm(trainer)

    def on_test_start(self, trainer, pl_module):
        keep_lightning_off_sigterm(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # that one: at the epoch's end instead
            self._stop_if_signalled(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop_if_signalled(trainer, pl_module)
