"""Weights & Biases for continual runs: the logger `logger=wandb` builds, and what it logs per task and at the end.

W&B draws every metric against one x-axis. Lightning's `WandbLogger` makes that the global step for everything,
which suits the per-step training losses; the accuracies measured after each task are declared here against the
number of tasks trained instead (`eval/tasks_trained`), so a dashboard draws one curve per task over the sequence.
Nothing here imports `wandb` until a W&B logger is actually built.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from src.continual import metrics

log = logging.getLogger(__name__)

TASK_AXIS = "eval/tasks_trained"


def _hydra_sweep() -> tuple[str | None, str | None]:
    """(sweep folder, the job's overrides) in a Hydra multirun; (None, None) in a single run or outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None, None
        return str(hydra_cfg.sweep.dir), hydra_cfg.job.override_dirname or None
    except (ImportError, ValueError, AttributeError):
        return None, None


def make_logger(save_dir: str, project: str = "continual", entity: str | None = None, name: str | None = None,
                group: str | None = None, tags=(), mode: str = "offline", **kwargs) -> WandbLogger:
    """The `WandbLogger` of `conf/logger/wandb.yaml`.

    `mode` is W&B's: offline (the default: files under `<save_dir>/wandb`, no account needed), online or disabled.
    `group=None` in a multirun groups the jobs of one sweep by the sweep folder, so a dashboard puts them side by
    side; each job's name gets its overrides (`seed=1,method=ewc`).
    """
    import wandb

    sweep_dir, job_overrides = _hydra_sweep()
    if group is None:
        group = sweep_dir
    if name and job_overrides:
        name = f"{name} [{job_overrides}]"
    if wandb.run is not None:
        # A run left open by an earlier job in this process (one that failed before finishing it): close it, or
        # this job would log into it (Lightning reuses `wandb.run`).
        wandb.finish(exit_code=1)
    kwargs.setdefault("settings", wandb.Settings(silent=True))
    # `mode` goes straight to wandb.init: Lightning's own `offline=True` would set WANDB_MODE for the whole process.
    logger = WandbLogger(save_dir=save_dir, project=project, entity=entity, name=name, group=group,
                         tags=list(tags or []), mode=mode, **kwargs)
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it has no effect
    if rank_zero_only.rank == 0:
        if mode in ("offline", "dryrun"):
            log.info("W&B offline (no account needed): files in %s/wandb; upload them later with "
                     "`wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
        else:
            log.info("W&B %s: project %s%s, group %s", mode, f"{entity}/" if entity else "", project, group)
    return logger


def is_wandb(logger) -> bool:
    return isinstance(logger, WandbLogger)


def metrics_so_far(results: dict) -> dict[str, float]:
    """Forgetting, BWT and FWT of the tasks trained so far (the top-left square of the accuracy matrix); they
    need two tasks, so they are absent after the first."""
    R = results["acc_matrix"]
    t = len(R)
    if t < 2:
        return {}
    square = [row[:t] for row in R]
    values = {"eval/forgetting": metrics.forgetting(square), "eval/bwt": metrics.backward_transfer(square)}
    if results.get("random_init_acc") is not None:
        values["eval/fwt"] = metrics.forward_transfer(square, results["random_init_acc"][:t])
    return values


def task_end_values(results: dict) -> dict[str, float]:
    """What is logged after each task: each task's accuracy, the average over the tasks seen, forgetting, BWT,
    FWT so far, and the task's wall time, all against `eval/tasks_trained`."""
    row = results["acc_matrix"][-1]
    values = {f"eval/acc_task_{j}": acc for j, acc in enumerate(row)}
    values[TASK_AXIS] = len(results["acc_matrix"])
    values["eval/avg_acc_seen"] = results["avg_acc_per_step"][-1]
    values.update(metrics_so_far(results))
    values["eval/task_time_s"] = results["task_times_s"][-1]
    if results.get("val_acc_matrix"):
        seen = results["val_acc_matrix"][-1][: len(results["acc_matrix"])]
        if None not in seen:
            values["eval/val_avg_acc_seen"] = sum(seen) / len(seen)
    return {k: v for k, v in values.items() if v is not None}  # cells not evaluated (eval.every_n_tasks, eval.tasks)


def _task_axis_keys(n_tasks: int) -> list[str]:
    return [*(f"eval/acc_task_{j}" for j in range(n_tasks)), "eval/avg_acc_seen", "eval/forgetting", "eval/bwt",
            "eval/fwt", "eval/task_time_s", "eval/val_avg_acc_seen"]


@rank_zero_only
def log_task_end(logger: WandbLogger, results: dict, step: int) -> None:
    """After each task (`TaskLoop._log_row`): one history row with the task index as its x-axis."""
    experiment = logger.experiment
    if not getattr(logger, "_task_axis_defined", False):
        # by name, not by glob: Lightning's `*` → trainer/global_step must not win over these
        experiment.define_metric(TASK_AXIS)
        for key in _task_axis_keys(results["n_tasks"]):
            experiment.define_metric(key, step_metric=TASK_AXIS)
        logger._task_axis_defined = True
    experiment.log({**task_end_values(results), "trainer/global_step": step})


def accuracy_table_rows(results: dict) -> tuple[list[str], list[list]]:
    """The accuracy matrix as table rows: `after` is the task trained last (-1: the untrained model)."""
    n = results["n_tasks"]
    columns = ["after", *(f"task_{j}" for j in range(n)), "avg_seen"]
    rows = [[-1, *results["random_init_acc"], None]] if results.get("random_init_acc") is not None else []
    rows += [[i, *row, results["avg_acc_per_step"][i]] for i, row in enumerate(results["acc_matrix"])]
    return columns, rows


@rank_zero_only
def log_final(logger: WandbLogger, results: dict, run_dir: Path) -> None:
    """At the end (`TaskLoop._finish`, after the plots): the accuracy matrix as a table and a heatmap, the final
    metrics in the summary; then the W&B run is closed, so a next job in this process starts its own."""
    import wandb

    experiment = logger.experiment
    columns, rows = accuracy_table_rows(results)
    values = {"results/acc_matrix": wandb.Table(columns=columns, data=rows)}
    for key, file in (("results/acc_matrix_heatmap", "acc_matrix.png"), ("results/avg_acc", "avg_acc.png")):
        if (Path(run_dir) / file).is_file():
            values[key] = wandb.Image(str(Path(run_dir) / file))
    experiment.log(values)
    summary = {f"final/{k}": results.get(k) for k in ("avg_acc", "forgetting", "bwt", "fwt", "val_avg_acc",
                                                      "wall_time_s")}
    summary["final/task_times_s"] = results.get("task_times_s")
    experiment.summary.update({k: v for k, v in summary.items() if v is not None})
    experiment.finish()
