"""SLURM requeue: a run that stops on the cluster environment's requeue signal has its job requeued, and the
restarted job continues the run in its own folder.

Lightning picks `SLURMEnvironment` inside a SLURM job; its `auto_requeue` (default true, the config's `auto_requeue`)
and `requeue_signal` (default SIGUSR1, which the SLURM preset asks SLURM to send before the time limit) are the
switch. What Lightning does with them is not used: its handler saves an hpc checkpoint from inside the signal
handler, in the middle of a step, and reloads it at the start of every `fit` (one per task). Here the run stops at
its safe point as on any signal (src/continual/preemption.py), and only then, with `last.ckpt` and results.json
written, rank 0 requeues the job with the command Lightning uses.

SLURM restarts a requeued job with the same command and `SLURM_RESTART_COUNT` >= 1 (also after a node failure or a
pre-emption with requeue). Such a job continues the run whose folder it would write into when that folder holds a
checkpoint, as `resume=<folder>` does; a finished one is then a no-op. The folder is the same only when the command
names it: `hydra.run.dir=<folder>` in a batch script, or the submitit launcher (the requeued job re-runs the pickled
job, whose sweep folder was resolved at submission). A default, time-stamped run folder is a new one after the
restart: the requeued job notes its folder in `outputs/.requeued/<job id>` (under the folder the command runs in),
and the restarted job continues that run (docs/sweeps.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

# Lightning is imported inside the functions: the entry point imports it only once the dataset is loading.

SCONTROL_TIMEOUT_S = 60


def trainer_plugins(cfg: DictConfig) -> dict:
    """Trainer keyword arguments that make `auto_requeue` Lightning's switch: inside a SLURM job, the config's
    plugins plus `SLURMEnvironment(auto_requeue=cfg.auto_requeue)`; nothing outside SLURM, or when the trainer's
    plugins already name a cluster environment (which then decides)."""
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    if not SLURMEnvironment.detect():
        return {}
    plugins = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    if any(isinstance(p, ClusterEnvironment) for p in plugins):
        return {}
    return {"plugins": [*plugins, SLURMEnvironment(auto_requeue=bool(cfg.get("auto_requeue", True)))]}


def cluster_environment(trainer):
    """The environment Lightning chose for this trainer (the attribute its own signal handling reads)."""
    return trainer._accelerator_connector.cluster_environment


def requeue_signal(trainer) -> int | None:
    """The signal on which this run's job is requeued: the SLURM environment's, when its auto_requeue is on."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = cluster_environment(trainer)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
        return int(env.requeue_signal)
    return None


def slurm_job_id() -> str:
    """`<array job>_<array task>` in a job array, else the job id: as Lightning's `_slurm_sigusr_handler_fn`."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job is not None else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_-]+", job):
        raise ValueError(f"not a SLURM job id: {job!r}")
    return job


def requeued_marker(job: str) -> Path:
    """Where a requeued job notes its run folder for its restart: under `outputs/` of the folder the command runs in
    (SLURM restarts a job there), as a folder named by the time is a new one after the restart."""
    return Path.cwd() / "outputs" / ".requeued" / job


def requeue_job(trainer, signum: int, run_dir: Path | None = None) -> dict | None:
    """After a stop on `signum`: on rank 0, when it is the requeue signal, `scontrol requeue <job>`; returns what
    happened for results.json (None: no requeue asked for).

    Lightning's requeue code cannot be called alone: it is the signal handler itself, which also finalizes the
    loggers and saves an hpc checkpoint (see the module docstring). This mirrors its job id and command, with a
    timeout: scontrol waits for the controller, and the job has `signal_delay_s` left."""
    if signum != requeue_signal(trainer) or not trainer.is_global_zero:
        return None
    try:
        job = slurm_job_id()
    except (KeyError, ValueError) as err:  # a SLURMEnvironment given by hand outside a SLURM job
        return {"job_id": None, "requeued": False, "scontrol_returncode": None, "error": f"no SLURM job id: {err}"}
    record = {"job_id": job, "requeued": False, "scontrol_returncode": None}
    try:
        record["scontrol_returncode"] = subprocess.run(["scontrol", "requeue", job], timeout=SCONTROL_TIMEOUT_S).returncode
    except FileNotFoundError:
        record["error"] = "scontrol not found"
    except subprocess.TimeoutExpired:
        record["error"] = f"scontrol did not answer in {SCONTROL_TIMEOUT_S} s"
    record["requeued"] = record["scontrol_returncode"] == 0
    if record["requeued"] and run_dir is not None:
        try:
            marker = requeued_marker(job)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{Path(run_dir).absolute()}\n")
        except OSError as err:  # the restarted job then finds the folder only if the command names it
            record["error"] = f"could not note the run folder for the restart: {err}"
    return record


def restart_count() -> int:
    """How often SLURM has restarted this job (requeued, or after a node failure); 0 outside SLURM."""
    if not os.environ.get("SLURM_JOB_ID"):
        return 0
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def folder_to_continue(folder: Path, noted: bool = False) -> Path | None:
    """In a job SLURM has restarted: `folder` when it holds a run to continue (its config and a checkpoint), else,
    with `noted` (a single run: one run per job), the folder the requeued job noted; else None, saying on stderr
    that a new run starts. Outside a restarted job: None."""
    count = restart_count()
    if count < 1:
        return None
    holds_run = lambda f: (f / "config.yaml").is_file() and (f / "checkpoints" / "last.ckpt").is_file()  # noqa: E731
    folder = Path(folder).absolute()
    marker = requeued_marker(slurm_job_id()) if noted and os.environ.get("SLURM_JOB_ID") else None
    noted = Path(marker.read_text().strip()) if marker is not None and marker.is_file() else None
    for candidate in (folder, noted):  # the folder the command names, else the one the requeued job noted
        if candidate is not None and holds_run(candidate):
            if marker is not None:
                marker.unlink(missing_ok=True)
            print(f"SLURM restarted this job (SLURM_RESTART_COUNT={count}): continuing the run in {candidate}",
                  file=sys.stderr, flush=True)
            return candidate
    print(f"note: SLURM restarted this job (SLURM_RESTART_COUNT={count}) and {folder} holds no run to continue (no "
          "config.yaml and checkpoints/last.ckpt), and no requeued run of this job was noted, so a new run starts "
          "there. In a multirun, fix the folder (hydra.sweep.dir=...) for a requeued job to continue its runs "
          "(docs/sweeps.md).", file=sys.stderr, flush=True)
    return None
