"""The loop over tasks. Lightning runs the epochs inside a task; this loop decides what crosses task boundaries.

One Trainer serves the whole sequence, so the global step, the loggers and the progress bar run on across tasks.
Each task gets exactly the length it was given: before every `fit` the loop moves the trainer's *cumulative* limits
(`fit_loop.max_epochs`, `epoch_loop.max_steps`) forward by one task's worth. `fit` calls `configure_optimizers`
again, so a fresh optimizer per task is the natural result (the module can carry the state over instead).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch

from src.continual import metrics, wandb_report
from src.continual.checkpointing import (
    RestoreRngAtTrainStart,
    StepCheckpoint,
    StopOnSignal,
    capture_rng,
    link_atomic,
    restore_rng,
    save_atomic,
)
from src.continual.module import ContinualModule
from src.continual.preemption import PREEMPTION, SIGNALS, Interrupted, interrupted_by_lightning
from src.continual.requeue import requeue_job, requeue_signal
from src.continual.results import SCHEMA_VERSION, format_table, write_json_atomic
from src.data.datamodule import TaskSequenceDataModule

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    pass


def peak_memory_mb() -> dict:
    """This process's peak resident memory (Linux's VmHWM: `ru_maxrss` would count the parent's memory from before
    `exec`) and, on a GPU, the peak of PyTorch's allocations."""
    peak = {"rss": None, "gpu": None}
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        peak["rss"] = int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def resident_memory_mb() -> float | None:
    """This process's resident memory now (Linux's VmRSS; None elsewhere)."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def process_age() -> float | None:
    """Seconds since this process started (Linux; None elsewhere): start-up includes the interpreter and imports.
    Both clocks count from boot in 10 ms ticks (/proc/stat's wall-clock boot time has only 1 s resolution)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


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
        checkpoint_every_n_steps: int = 0,
        plots: bool = False,
    ):
        self.trainer, self.module, self.dm = trainer, module, datamodule
        self.run_dir = Path(run_dir)
        self.epochs_per_task, self.steps_per_task = epochs_per_task, steps_per_task
        self.save_checkpoints, self.plots = save_checkpoints, plots
        self.keep_every_task = bool((config.get("checkpoint") or {}).get("keep_every_task", False))
        evaluation = config.get("eval") or {}  # what to evaluate after each task (conf/train.yaml `eval`)
        self.eval_every, self.eval_which = evaluation.get("every_n_tasks", 1), evaluation.get("tasks", "all")
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if save_checkpoints and checkpoint_every_n_steps > 0:
            trainer.callbacks.append(StepCheckpoint(last, checkpoint_every_n_steps))
        # after StepCheckpoint: a signal during its write stops the run right after it
        trainer.callbacks.append(StopOnSignal(last if save_checkpoints else None))  # SIGTERM/SIGINT/SIGUSR1
        self._rng_at_train_start = RestoreRngAtTrainStart()  # a mid-task checkpoint's RNG states
        trainer.callbacks.append(self._rng_at_train_start)
        if requeue_signal(trainer) not in (None, *SIGNALS):  # a SLURM requeue_signal of the user's choice: ours too
            PREEMPTION.install((requeue_signal(trainer),))
        self.started = time.perf_counter()
        self._cpu_spent: dict[str, float] = {}
        self.results = {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "error": None,
            "config": config,
            "method": type(module.regularizer).__name__.lower(),
            "scenario": module.scenario.name,
            "n_tasks": datamodule.n_tasks,
            "task_classes": datamodule.task_classes(),
            # what defines the tasks (class order, permutations, angles), so a run can be reproduced exactly
            "tasks": datamodule.tasks.describe(datamodule.input_shape),
            "random_init_acc": None,
            "acc_matrix": [],
            "val_acc_matrix": [] if datamodule.has_validation() else None,
            "avg_acc": None,
            "avg_acc_per_step": [],
            "forgetting": None,
            "forgetting_exact": None,  # false: some cells forgetting takes its maximum over were not evaluated
            "bwt": None,
            "fwt": None,
            "val_avg_acc": None,
            "method_summary": {},
            "steps_per_task": [],
            "task_times_s": [],
            # per task: seconds in train / task_end / eval / checkpoint (wall, and this process's CPU: `*_cpu_s`),
            # resident memory at its end, checkpoint size
            "task_costs": [],
            # startup: process start → this loop (imports, config, data, model); first_step: process start → first
            # training step; data: loading the dataset (part of startup); the rest are sums over the run
            # results_written: process start → the newest write of this file (the final one, once finished)
            "timing_s": {"startup": process_age(), "first_step": None, "data": None,
                         "train": 0.0, "task_end": 0.0, "eval": 0.0, "checkpoint": 0.0, "results_written": None},
            "wall_time_s": None,
            "peak_memory_mb": None,  # {"rss": resident memory, "gpu": PyTorch's GPU allocations}, peaks so far
            "requeue": None,  # a stop on SLURM's requeue signal: {"job_id", "requeued", "scontrol_returncode"}
        }

    # ---- one evaluation: accuracy on every task ------------------------------------------------------------------
    def evaluate(self, split: str = "test", tasks: list[int] | None = None) -> list[float | None]:
        """Accuracy on every task, or on `tasks` only (the others None)."""
        # what an evaluation cut short would leave changed: the global RNG (each DataLoader iterator draws from it)
        # and the modules' train/eval modes (Lightning restores them at the evaluation's end)
        rng, modes = capture_rng(), [(m, m.training) for m in self.module.modules()]
        while True:
            self.dm.eval_split, self.dm.eval_tasks = split, tasks
            try:
                self.trainer.test(self.module, datamodule=self.dm, verbose=False)
                break
            except BaseException as err:  # Lightning cut the evaluation short on SIGTERM: the run stops after
                if not interrupted_by_lightning(err):  # this task's end (preemption.py), so evaluate in full,
                    raise                              # as if uninterrupted
                restore_rng(rng)
                for module, training in modes:
                    module.train(training)
            finally:
                self.dm.eval_tasks = None
        if tasks is None:
            return list(self.module.last_eval)
        row = [None] * self.dm.n_tasks
        for j, acc in zip(tasks, self.module.last_eval, strict=True):
            row[j] = acc
        return row

    def tasks_to_evaluate(self, task: int) -> list[int]:
        """After training `task`: every task, [] for none (eval.every_n_tasks: a row of nulls; the last task is always
        evaluated), or with eval.tasks=seen_and_next tasks 0…task+1."""
        last = task == self.dm.n_tasks - 1
        if not last and (task + 1) % self.eval_every:
            return []
        if self.eval_which == "seen_and_next" and not last:
            return list(range(task + 2))
        return list(range(self.dm.n_tasks))

    def _evaluate_row(self, split: str, task: int) -> list[float | None]:
        tasks = self.tasks_to_evaluate(task)
        if not tasks:
            return [None] * self.dm.n_tasks
        return self.evaluate(split, None if len(tasks) == self.dm.n_tasks else tasks)

    def _timed(self, key, fn, *args):
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.results["timing_s"][key] += time.perf_counter() - start
        # CPU seconds too: on a shared machine wall time follows the neighbours' load, CPU time the work done
        self._cpu_spent[key] = self._cpu_spent.get(key, 0.0) + time.process_time() - cpu
        return out

    # ---- the sequence --------------------------------------------------------------------------------------------
    def run(self, resume_from: Path | None = None) -> dict:
        """Train every task; with `resume_from` (a checkpoint of this run), continue where it was taken."""
        try:
            with PREEMPTION.deferred():
                self._run(resume_from)
        except BaseException as err:
            # Lightning's own SIGTERMException: it stopped between our safe points (a signal just after one of
            # them), so the newest checkpoint is the one to continue from
            stopped = Interrupted(signal.SIGTERM) if interrupted_by_lightning(err) else err
            with PREEMPTION.deferred():  # SLURM signals a job it requeues: that must not cut what follows
                self._record_stop(stopped, err)
            if stopped is not err:
                raise stopped from None
            raise
        return self.results

    def _record_stop(self, stopped: BaseException, err: BaseException) -> None:
        """results.json says how the run stopped; after a stop on SLURM's requeue signal, with the checkpoint and
        that file written, the job is requeued (src/continual/requeue.py) and results.json says so too."""
        interrupted = isinstance(stopped, Interrupted)
        self.results["status"] = "interrupted" if interrupted else "failed"
        self.results["error"] = str(stopped) if interrupted else f"{type(err).__name__}: {err}"
        self._write()
        if not interrupted:
            return
        requeue = requeue_job(self.trainer, stopped.signum, self.run_dir)
        if requeue is None:
            self._info("%s: continue with `python -m src.train resume=%s`", stopped, self.run_dir)
            return
        self.results["requeue"] = requeue
        self._write()
        if requeue["requeued"]:
            self._info("%s: SLURM job %s requeued; it continues this run when it restarts", stopped, requeue["job_id"])
        else:
            log.warning("%s: requeueing SLURM job %s failed (scontrol: %s); continue with `python -m src.train "
                        "resume=%s`", stopped, requeue["job_id"],
                        requeue.get("error") or f"exit code {requeue['scontrol_returncode']}", self.run_dir)

    def _run(self, resume_from: Path | None) -> None:
        first_task, mid_task = 0, None
        if resume_from is not None:
            first_task, mid_task = self._restore(resume_from)
        else:
            self.module.trained_up_to = -1
            self.results["random_init_acc"] = self._timed("eval", self.evaluate)
            self._write()
        for task in range(first_task, self.dm.n_tasks):
            if task > 0 or resume_from is not None:  # a signal since the last safe point: the newest checkpoint
                self._stop_if_signalled()            # (or none, with save_checkpoints=false) is this state
            self._train_task(task, resume=mid_task if task == first_task else None)
        self.results["status"] = "finished"
        self._finish()

    def _train_task(self, task: int, resume: dict | None = None) -> None:
        """Train, end and evaluate one task; `resume` holds the loop state of a checkpoint taken inside it."""
        regularizer, n_tasks = self.module.regularizer, self.dm.n_tasks
        task_start = time.perf_counter()
        spent_before, cpu_before = dict(self.results["timing_s"]), dict(self._cpu_spent)
        self.dm.set_task(task, include_past=regularizer.trains_on_past_tasks)
        self.module.current_task = task
        self._info("task %d/%d: classes %s, training on task(s) %s%s", task + 1, n_tasks,
                   self.results["task_classes"][task], self.dm.train_tasks, " (resumed)" if resume else "")
        if resume is None:
            regularizer.on_task_start(task, self.module, self.dm)
            start_step, start_epoch = self.trainer.global_step, self.trainer.current_epoch
        else:  # on_task_start already ran before the checkpoint; its effects are in the restored state
            start_step, start_epoch = resume["task_start_step"], resume["task_start_epoch"]
        self.dm.task_start_step = start_step
        self.module.loop_state = {"phase": "training", "task": task, "task_start_step": start_step,
                                  "task_start_epoch": start_epoch, "results": self._results_for_checkpoint()}
        self._set_limits(start_step, start_epoch)
        ckpt_path = None
        if resume is not None:
            ckpt_path = resume["path"]
            self._rng_at_train_start.state = resume["rng"]
        self._timed("train", lambda: self.trainer.fit(self.module, datamodule=self.dm, ckpt_path=ckpt_path,
                                                      weights_only=False))
        if self.results["timing_s"]["first_step"] is None and self.module.first_step_at is not None:
            age = process_age()
            self.results["timing_s"]["first_step"] = age and age - (time.time() - self.module.first_step_at)
        # A resumed fit that had nothing left to do returns while Lightning still flags its loops as restarting,
        # which would make the next task's fit act as if it were resuming too.
        self.trainer.fit_loop.restarting = False
        self.results["steps_per_task"].append(self.trainer.global_step - start_step)
        self._timed("task_end", regularizer.on_task_end, task, self.module, self.dm)
        self.results["method_summary"] = regularizer.summary()

        self.module.trained_up_to = task
        row = self._timed("eval", self._evaluate_row, "test", task)
        self.results["acc_matrix"].append(row)
        if self.results["val_acc_matrix"] is not None:
            self.results["val_acc_matrix"].append(self._timed("eval", self._evaluate_row, "val", task))
        self.results["task_times_s"].append(time.perf_counter() - task_start)
        self._update_metrics()
        self._log_row(task, row)
        spent = self.results["timing_s"]
        costs = {f"{k}_s": spent[k] - spent_before[k] for k in ("train", "task_end", "eval")}
        costs.update({f"{k}_cpu_s": self._cpu_spent.get(k, 0.0) - cpu_before.get(k, 0.0)
                      for k in ("train", "task_end", "eval")})
        self.results["task_costs"].append({**costs, "rss_mb": resident_memory_mb()})
        if self.save_checkpoints:
            self._timed("checkpoint", self._checkpoint, task)
            costs = self.results["task_costs"][-1]
            costs["checkpoint_s"] = spent["checkpoint"] - spent_before["checkpoint"]
            costs["checkpoint_cpu_s"] = self._cpu_spent["checkpoint"] - cpu_before.get("checkpoint", 0.0)
            with contextlib.suppress(OSError):
                costs["checkpoint_mb"] = (self.run_dir / "checkpoints" / "last.ckpt").stat().st_size / 2**20
        self._write()
        avg = self.results["avg_acc_per_step"][-1]
        self._info("task %d/%d done: %d steps in %.1f s, average accuracy on tasks so far %s",
                   task + 1, n_tasks, self.results["steps_per_task"][-1], self.results["task_times_s"][-1],
                   "not evaluated" if avg is None else f"{100 * avg:.2f}%")

    def _stop_if_signalled(self) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        signum = PREEMPTION.agreed(self.trainer if distributed else None)
        if signum is not None:
            raise Interrupted(signum)

    def _restore(self, path: Path) -> tuple[int, dict | None]:
        """Load a checkpoint of this run: returns the task to start with, and its loop state if it was taken
        in the middle of that task (else None: the task starts from its beginning)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        state = checkpoint.get("continual", {})
        if "phase" not in state:
            raise ResumeError(f"{path}: not a checkpoint of a task sequence run")
        saved = state["results"]
        self.results.update({k: v for k, v in saved.items() if k in self.results and k not in ("config", "threads")})
        self.results["status"], self.results["error"], self.results["requeue"] = "running", None, None
        self.started = time.perf_counter() - (saved.get("wall_time_s") or 0.0)
        self.module.on_load_checkpoint(checkpoint)
        task = state["task"]
        self._info("resuming from %s: task %d, %s", path, task + 1,
                   "after its evaluation" if state["phase"] == "done" else f"at step {checkpoint['global_step']}")
        if state["phase"] == "done":
            self.module.load_state_dict(checkpoint["state_dict"])
            # Lightning's counters as they were (global step, epoch, batches): the logs go on from there
            self.trainer.fit_loop.load_state_dict(checkpoint["loops"]["fit_loop"])
            self.trainer.fit_loop.restarting = False
            restore_rng(state["rng"])
            return task + 1, None
        return task, {**state, "path": str(path)}

    def _results_for_checkpoint(self) -> dict:
        self.results["wall_time_s"] = time.perf_counter() - self.started
        return {k: v for k, v in self.results.items() if k != "config"}

    def _info(self, *args) -> None:
        if self.trainer.is_global_zero:
            log.info(*args)

    def _set_limits(self, start_step: int, start_epoch: int) -> None:
        """Lightning's limits are cumulative: set them to this task's start plus exactly one task's length."""
        fit_loop = self.trainer.fit_loop
        if self.steps_per_task > 0:
            fit_loop.max_epochs = -1
            fit_loop.epoch_loop.max_steps = start_step + self.steps_per_task
        else:
            fit_loop.max_epochs = start_epoch + self.epochs_per_task
            fit_loop.epoch_loop.max_steps = -1

    def _update_metrics(self) -> None:
        R = self.results["acc_matrix"]
        self.results["avg_acc_per_step"] = metrics.average_accuracy_per_step(R)
        if len(R) == self.dm.n_tasks:
            self.results.update(metrics.summarize(R, self.results["random_init_acc"]))
            if self.results["val_acc_matrix"]:
                self.results["val_avg_acc"] = metrics.average_accuracy(self.results["val_acc_matrix"])

    def _log_row(self, task: int, row: list[float]) -> None:
        values = {f"eval/acc_task_{j}": acc for j, acc in enumerate(row) if acc is not None}
        if self.results["avg_acc_per_step"][-1] is not None:
            values["eval/avg_acc_seen"] = self.results["avg_acc_per_step"][-1]
        values["eval/tasks_trained"] = task + 1
        for logger in self.trainer.loggers:
            if wandb_report.is_wandb(logger):  # against the task index, with forgetting, BWT, FWT, time so far
                wandb_report.log_task_end(logger, self.results, step=self.trainer.global_step)
            else:
                logger.log_metrics(values, step=self.trainer.global_step)

    def _checkpoint(self, task: int) -> None:
        """`last.ckpt` after each task (all that resume needs); with `checkpoint.keep_every_task=true` also
        `task_<t>.ckpt`, last.ckpt then being a hard link to the newest."""
        folder = self.run_dir / "checkpoints"
        self.module.loop_state = {"phase": "done", "task": task, "results": self._results_for_checkpoint()}
        if not self.keep_every_task:
            save_atomic(self.trainer, folder / "last.ckpt")
            return
        final = folder / f"task_{task}.ckpt"
        save_atomic(self.trainer, final)
        if self.trainer.is_global_zero:
            link_atomic(final, folder / "last.ckpt")

    def _write(self) -> None:
        if self.trainer.is_global_zero:
            self.results["wall_time_s"] = time.perf_counter() - self.started
            self.results["peak_memory_mb"] = peak_memory_mb()
            self.results["timing_s"]["results_written"] = process_age()
            write_json_atomic(self.run_dir / "results.json", self.results)

    def _finish(self) -> None:
        """After the last evaluation: the plots (≈ 0.7 s) unless `plots=false` (always for W&B, which uploads them),
        then results.json, written last so that `finished` means every output is there; then only what is cheap: the
        loggers' last rows, closed, and the table."""
        if self.trainer.is_global_zero and (
                self.plots or any(wandb_report.is_wandb(logger) for logger in self.trainer.loggers)):
            from src.continual.plots import plot_run

            plot_run(self.results, self.run_dir)
        self._write()
        if not self.trainer.is_global_zero:
            return
        final = {k: self.results[k] for k in ("avg_acc", "forgetting", "bwt", "fwt") if self.results[k] is not None}
        for logger in self.trainer.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in final.items()}, step=self.trainer.global_step)
            if wandb_report.is_wandb(logger):  # the accuracy matrix as a table and a heatmap; closes the W&B run
                wandb_report.log_final(logger, self.results, self.run_dir)
            logger.finalize("success")  # written and closed: nothing is left for the interpreter's exit to flush
        print("\n" + format_table(self.results) + f"\nrun folder: {self.run_dir}\n", flush=True)
