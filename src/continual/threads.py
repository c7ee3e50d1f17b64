"""How many CPU threads a job's torch uses: cores ÷ parallel jobs inside a local parallel sweep.

Without this, N jobs of a local sweep each start torch with one intra-op thread per core (and as many inter-op
threads), N × cores threads on `cores` cores, and spin-waiting OpenMP threads thrash: identical tasks took 8–100 s
(issue 15). What the launchers do by themselves:
- joblib (loky workers) sets OMP_NUM_THREADS, MKL_NUM_THREADS, … to cpu_count ÷ n_jobs in its workers unless the
  parent's environment sets them, and torch's intra-op pool follows OMP_NUM_THREADS; its inter-op pool does not
  (one thread per core), and a user's exported OMP_NUM_THREADS wins over loky's.
- submitit_local starts every job at once (up to `array_parallelism`) and sets nothing.
- basic runs jobs one after another: each may use every core.

`threads: auto` (conf/train.yaml) makes it explicit: inside a multirun job of a local parallel launcher, torch's
intra-op and inter-op threads (and OMP/MKL for libraries started later) = max(1, cores ÷ parallel jobs), with cores
this process's CPU affinity; elsewhere torch's own choice stands. `threads: <int>` sets that number in any run.
What was chosen goes to results.json (`threads`).
"""

from __future__ import annotations

import os

from src.continual.validate import ConfigError

# Hydra launchers (`hydra.launcher._target_`, by class name) that run jobs in parallel on this machine
LOCAL_PARALLEL = ("JoblibLauncher", "LocalLauncher")
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def check_threads(value) -> None:
    """`threads`: auto or an integer >= 1."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"threads={value!r} is invalid: auto or an integer >= 1")


def available_cores() -> int:
    """The cores this process may run on (its affinity: a cgroup or `taskset` may give it fewer than the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parallel_jobs(launcher: dict, cores: int) -> int | None:
    """How many jobs a local parallel launcher runs at once (None: not a local parallel launcher).

    joblib: `n_jobs` (negative: cores + 1 + n_jobs, as joblib counts). submitit_local: `array_parallelism`, at most
    `cores` (with more, every job gets one thread anyway); its `cpus_per_task`, when set, is taken per job instead."""
    target = str((launcher or {}).get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name not in LOCAL_PARALLEL:
        return None
    if name == "JoblibLauncher":
        n_jobs = launcher.get("n_jobs", -1)
        n_jobs = int(n_jobs) if n_jobs is not None else 1
        return max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)
    per_task = launcher.get("cpus_per_task")
    if per_task:
        return max(1, cores // int(per_task))
    return max(1, min(int(launcher.get("array_parallelism") or 1), cores))


def choose(threads, launcher: dict | None, multirun: bool, cores: int) -> tuple[int | None, int | None]:
    """(threads per job, parallel jobs): threads None means leave torch's defaults."""
    if threads != "auto":
        return int(threads), None
    jobs = parallel_jobs(launcher or {}, cores) if multirun else None
    if jobs is None:
        return None, None
    return max(1, cores // jobs), jobs


def set_threads(threads, launcher: dict | None = None, multirun: bool = False) -> dict:
    """Apply `threads` to torch (call before any parallel work: inter-op threads can be set once per process) and
    return what a job ends up with, for results.json."""
    import torch

    cores = available_cores()
    before = {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}
    per_job, jobs = choose(threads, launcher, multirun, cores)
    if per_job is not None:
        for var in ENV_VARS:  # for libraries that start their pools later (and for child processes)
            os.environ[var] = str(per_job)
        torch.set_num_threads(per_job)
        try:
            torch.set_num_interop_threads(per_job)
        except RuntimeError:  # already set, or the pool already ran (a reused joblib worker: set by its first job)
            pass
    return {"setting": threads, "cores": cores, "parallel_jobs": jobs, "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(), "torch_default": before}
