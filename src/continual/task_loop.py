"""The loop over tasks. Lightning runs the epochs inside a task; this loop decides what crosses task boundaries.

One Trainer serves the whole sequence, so the global step, the loggers and the progress bar run on across tasks.
Each task gets exactly the length it was given: before every `fit` the loop moves the trainer's *cumulative* limits
(`fit_loop.max_epochs`, `epoch_loop.max_steps`) forward by one task's worth. `fit` calls `configure_optimizers`
again, so a fresh optimizer per task is the natural result (the module can carry the state over instead).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L

from src.continual import metrics
from src.continual.module import ContinualModule
from src.continual.plots import plot_accuracy_matrix, plot_average_accuracy
from src.continual.results import SCHEMA_VERSION, format_table, write_json_atomic
from src.data.datamodule import TaskSequenceDataModule

log = logging.getLogger(__name__)


class TaskLoop:
    def __init__(
        self,
        trainer: L.Trainer,
        module: ContinualModule,
        datamodule: TaskSequenceDataModule,
        run_dir: Path,
        epochs_per_task: int,
        steps_per_task: int,
        config: dict,
        save_checkpoints: bool = True,
    ):
        self.trainer, self.module, self.dm = trainer, module, datamodule
        self.run_dir = Path(run_dir)
        self.epochs_per_task, self.steps_per_task = epochs_per_task, steps_per_task
        self.save_checkpoints = save_checkpoints
        self.started = time.perf_counter()
        self.results = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "error": None,
            "config": config,
            "method": type(module.regularizer).__name__.lower(),
            "scenario": module.scenario.name,
            "n_tasks": datamodule.n_tasks,
            "task_classes": datamodule.task_classes(),
            "random_init_acc": None,
            "acc_matrix": [],
            "val_acc_matrix": [] if datamodule.has_validation() else None,
            "avg_acc": None,
            "avg_acc_per_step": [],
            "forgetting": None,
            "bwt": None,
            "fwt": None,
            "val_avg_acc": None,
            "steps_per_task": [],
            "task_times_s": [],
            "timing_s": {"train": 0.0, "task_end": 0.0, "eval": 0.0, "checkpoint": 0.0},
            "wall_time_s": None,
        }

    # ---- one evaluation: accuracy on every task ------------------------------------------------------------------
    def evaluate(self, split: str = "test") -> list[float]:
        self.dm.eval_split = split
        self.trainer.test(self.module, datamodule=self.dm, verbose=False)
        return list(self.module.last_eval)

    def _timed(self, key, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.results["timing_s"][key] += time.perf_counter() - start
        return out

    # ---- the sequence --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self._run()
        except BaseException as err:
            self.results["status"] = "failed"
            self.results["error"] = f"{type(err).__name__}: {err}"
            self._write()
            raise
        return self.results

    def _run(self) -> None:
        regularizer, n_tasks = self.module.regularizer, self.dm.n_tasks
        self.module.trained_up_to = -1
        self.results["random_init_acc"] = self._timed("eval", self.evaluate)
        self._write()
        for task in range(n_tasks):
            task_start = time.perf_counter()
            self.dm.set_task(task, include_past=regularizer.trains_on_past_tasks)
            self.module.current_task = task
            self._info(
                "task %d/%d: classes %s, training on task(s) %s",
                task + 1, n_tasks, self.results["task_classes"][task], self.dm.train_tasks,
            )
            regularizer.on_task_start(task, self.module, self.dm)
            steps_before = self.trainer.global_step
            self._extend_limits()
            self._timed("train", self.trainer.fit, self.module, None, None, self.dm)
            self.results["steps_per_task"].append(self.trainer.global_step - steps_before)
            self._timed("task_end", regularizer.on_task_end, task, self.module, self.dm)

            self.module.trained_up_to = task
            row = self._timed("eval", self.evaluate, "test")
            self.results["acc_matrix"].append(row)
            if self.results["val_acc_matrix"] is not None:
                self.results["val_acc_matrix"].append(self._timed("eval", self.evaluate, "val"))
            self.results["task_times_s"].append(time.perf_counter() - task_start)
            self._update_metrics()
            self._log_row(task, row)
            if self.save_checkpoints:
                self._timed("checkpoint", self._checkpoint, task)
            self._write()
            self._info(
                "task %d/%d done: %d steps in %.1f s, average accuracy on tasks so far %.2f%%",
                task + 1, n_tasks, self.results["steps_per_task"][-1], self.results["task_times_s"][-1],
                100 * self.results["avg_acc_per_step"][-1],
            )
        self.results["status"] = "finished"
        self._finish()

    def _info(self, *args) -> None:
        if self.trainer.is_global_zero:
            log.info(*args)

    def _extend_limits(self) -> None:
        """Move the trainer's cumulative limits forward by exactly one task."""
        fit_loop = self.trainer.fit_loop
        if self.steps_per_task > 0:
            fit_loop.max_epochs = -1
            fit_loop.epoch_loop.max_steps = self.trainer.global_step + self.steps_per_task
        else:
            fit_loop.max_epochs = self.trainer.current_epoch + self.epochs_per_task
            fit_loop.epoch_loop.max_steps = -1

    def _update_metrics(self) -> None:
        R = self.results["acc_matrix"]
        self.results["avg_acc_per_step"] = metrics.average_accuracy_per_step(R)
        if len(R) == self.dm.n_tasks:
            self.results.update(metrics.summarize(R, self.results["random_init_acc"]))
            if self.results["val_acc_matrix"]:
                self.results["val_avg_acc"] = metrics.average_accuracy(self.results["val_acc_matrix"])

    def _log_row(self, task: int, row: list[float]) -> None:
        values = {f"eval/acc_task_{j}": acc for j, acc in enumerate(row)}
        values["eval/avg_acc_seen"] = self.results["avg_acc_per_step"][-1]
        values["eval/tasks_trained"] = task + 1
        for logger in self.trainer.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)

    def _checkpoint(self, task: int) -> None:
        """`task_<t>.ckpt` after each task (atomically: written under a temporary name, then renamed), and
        `last.ckpt` as a hard link to the newest one."""
        folder = self.run_dir / "checkpoints"
        self.module.loop_state = {"next_task": task + 1, "results": {k: v for k, v in self.results.items() if k != "config"}}
        tmp = folder / f".task_{task}.ckpt.tmp"
        self.trainer.save_checkpoint(tmp, weights_only=False)  # collective under DDP; rank 0 writes
        if self.trainer.is_global_zero:
            final = folder / f"task_{task}.ckpt"
            os.replace(tmp, final)
            link_tmp = folder / ".last.ckpt.tmp"
            if link_tmp.exists():
                link_tmp.unlink()
            os.link(final, link_tmp)
            os.replace(link_tmp, folder / "last.ckpt")

    def _write(self) -> None:
        if self.trainer.is_global_zero:
            self.results["wall_time_s"] = time.perf_counter() - self.started
            write_json_atomic(self.run_dir / "results.json", self.results)

    def _finish(self) -> None:
        self._write()
        if not self.trainer.is_global_zero:
            return
        title = f"{self.results['method']} · {self.results['scenario']}-incremental"
        plot_accuracy_matrix(self.results["acc_matrix"], self.run_dir / "acc_matrix.png", title)
        plot_average_accuracy(self.results["avg_acc_per_step"], self.run_dir / "avg_acc.png", title)
        final = {k: self.results[k] for k in ("avg_acc", "forgetting", "bwt", "fwt") if self.results[k] is not None}
        for logger in self.trainer.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, step=self.trainer.global_step)
            logger.save()
        print("\n" + format_table(self.results) + f"\nrun folder: {self.run_dir}\n", flush=True)
