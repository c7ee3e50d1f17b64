"""Loggers that continue a resumed run's logs instead of starting them again.

Lightning's CSVLogger deletes `metrics.csv` when its folder is not empty, and keeps rows in memory until it flushes
(every 100 steps): a resumed run lost every row before the resume, a killed run its last rows. `ContinuingCSVLogger`
writes each row as it is logged and, on resume, keeps exactly the rows logged before the checkpoint the run continues
from (the ones after it, up to the kill, would be logged again), so each step appears once. TensorBoard's writer
appends a new event file to the same folder; `purge_step` makes TensorBoard hide what the old files hold from the
checkpoint on. W&B continues the run id found in `<run>/wandb/` (`resume="allow"`).

Rows come in two kinds, with two step counters: Lightning's per-batch rows (`train/…`, `epoch`) at the index of the
batch (0-based), and the task loop's rows (`eval/…` after each task, `final/…` at the end) at the global step when
they were logged. A checkpoint at global step G taken inside a task is saved before its batch's row is logged and
before the task's evaluation; one taken after a task ("done") after that task's evaluation rows.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only


@dataclass(frozen=True)
class LogPosition:
    """Where a checkpoint is in the logs: `batches` batches stepped, `global_step` optimizer steps, and its phase
    (`training`: inside a task; `done`: after a task's evaluation)."""

    batches: int
    global_step: int
    phase: str
    task_end_row: dict | None = None  # "done": the evaluation rows logged at `global_step` just before it

    @classmethod
    def of_checkpoint(cls, path: Path) -> LogPosition:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        epoch_loop = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        step = int(ckpt.get("global_step", 0))
        state = ckpt.get("continual", {})
        results = state.get("results", {})
        row = None
        if state.get("phase", "done") == "done" and results.get("acc_matrix"):  # as TaskLoop._log_row logs it
            row = {f"eval/acc_task_{j}": acc for j, acc in enumerate(results["acc_matrix"][-1])}
            row["eval/avg_acc_seen"] = results["avg_acc_per_step"][-1]
            row["eval/tasks_trained"] = len(results["acc_matrix"])
        return cls(int(epoch_loop.get("_batches_that_stepped", step)), step, state.get("phase", "done"), row)

    def logged_before(self, row: dict) -> bool:
        """Whether a row of metrics.csv was logged before this checkpoint was taken."""
        step = int(float(row["step"]))
        filled = [k for k, v in row.items() if v not in ("", None) and k != "step"]
        if not any(k.startswith(("eval/", "final/")) for k in filled):
            return step < self.batches + (1 if self.phase == "training" else 0)
        if step != self.global_step:
            return step < self.global_step
        return self.phase == "done" and any(k.startswith("eval/") for k in filled)


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, but it keeps the rows already in metrics.csv and writes each row when it is logged."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])

    def log_metrics(self, metrics_dict, step=None) -> None:
        super().log_metrics(metrics_dict, step)
        _ExperimentWriter.save(self)

    def keep_rows_before(self, position: LogPosition) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._replace_rows([row for row in rows if position.logged_before(row)], self.metrics_keys)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """A new column (e.g. a task's first evaluation, EWC's Fisher statistics) makes the header change, so the file
        is written again: through a temporary file and a rename, so a kill meanwhile leaves the old file whole
        (Lightning's own truncates it in place)."""
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._replace_rows(rows, fieldnames)

    def _replace_rows(self, rows: list[dict], fieldnames: list[str]) -> None:
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class ContinuingCSVLogger(CSVLogger):
    """`logger=csv`: `<run>/csv/metrics.csv`, continued (never truncated) when the run is resumed."""

    @property
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def continue_from(self, position: LogPosition) -> None:
        self.experiment.keep_rows_before(position)


class ContinuingTensorBoardLogger(TensorBoardLogger):
    """`logger=tensorboard`: a resumed run writes a new event file into the same folder, and TensorBoard hides
    every event the old ones hold from the checkpoint's step on (`purge_step`: it cannot tell rows apart by kind, so
    the evaluation rows a "done" checkpoint follows are logged again, from the checkpoint)."""

    def continue_from(self, position: LogPosition) -> None:
        if self._experiment is None:
            self._kwargs["purge_step"] = position.global_step
        if position.task_end_row:
            self.log_metrics(position.task_end_row, step=position.global_step)


def previous_wandb_id(save_dir) -> str | None:
    """The id of the W&B run already in `<save_dir>/wandb/` (online `run-<time>-<id>` or `offline-run-…`)."""
    runs = sorted(Path(save_dir, "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    for folder in reversed(runs):
        match = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)", folder.name)
        if match:
            return match.group(1)
    return None
