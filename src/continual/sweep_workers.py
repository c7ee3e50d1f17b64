"""Parallel sweep jobs on one machine start from a process that has already imported torch and Lightning.

joblib's loky workers are fresh interpreters: each imports torch, torch._dynamo and Lightning again (≈ 5 CPU-seconds
on a 2-core machine, as long as a short job's training), so a 4-job sweep on 2 cores paid that 4 times where 2
workers pay it twice (issue 15). With `sweep_workers: forkserver` (the default) a Hydra callback switches loky to
Python's forkserver start method and preloads what a run imports before its first step: the server imports it once
and every worker is a fork of it (copy-on-write: the imported modules are shared, not loaded again). The server
imports modules only and never runs torch's thread pools, so forking it is safe (the reason fork from a process that
has trained is not). `sweep_workers: loky` keeps joblib's own workers. Only the joblib launcher is concerned: the
basic launcher runs its jobs in the Hydra process, submitit and SLURM start their own processes.
"""

from __future__ import annotations

import multiprocessing

from hydra.experimental.callback import Callback

CHOICES = ("forkserver", "loky")
PRELOAD = ["src.continual.preload"]
PLOTS_PRELOAD = "src.continual.preload_plots"  # matplotlib (≈ 0.8 CPU-s a worker), when the runs draw plots


def check_sweep_workers(choice) -> None:
    if choice not in CHOICES:
        from src.continual.validate import ConfigError

        raise ConfigError(f"sweep_workers={choice!r} is invalid: one of {', '.join(CHOICES)}")


class ForkserverSweepWorkers(Callback):
    """Hydra callback (conf/hydra/default.yaml), in the process that launches the sweep. A bad value is refused by
    each job's config check (Hydra turns a callback's exception into a warning)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if not launcher.endswith("JoblibLauncher") or config.get("sweep_workers", "forkserver") != "forkserver":
            return
        from joblib.externals.loky.backend.context import set_start_method

        multiprocessing.set_forkserver_preload(PRELOAD + ([PLOTS_PRELOAD] if config.get("plots", True) else []))
        set_start_method("forkserver", force=True)
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the server imports while Hydra prepares the jobs, not after
