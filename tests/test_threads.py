"""Threads per job: cores ÷ parallel jobs of a local sweep (src/continual/threads.py). The joblib end-to-end check
(thread counts read back from results.json) is in tests/test_sweeps.py::test_joblib_launcher_two_parallel_jobs."""

from __future__ import annotations

import pytest

from src.continual.threads import choose, parallel_jobs
from tests.helpers import run_train

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.parametrize("launcher, cores, jobs", [
    ({"_target_": JOBLIB, "n_jobs": 2}, 2, 2),
    ({"_target_": JOBLIB, "n_jobs": 4}, 2, 4),
    ({"_target_": JOBLIB, "n_jobs": -1}, 8, 8),  # joblib's count: cores + 1 + n_jobs
    ({"_target_": JOBLIB, "n_jobs": -2}, 8, 7),
    ({"_target_": SUBMITIT_LOCAL, "array_parallelism": 256}, 8, 8),
    ({"_target_": SUBMITIT_LOCAL, "array_parallelism": 2}, 8, 2),
    ({"_target_": SUBMITIT_LOCAL, "array_parallelism": 256, "cpus_per_task": 4}, 8, 2),
    ({"_target_": BASIC}, 8, None),
])
def test_parallel_jobs_of_each_launcher(launcher, cores, jobs):
    assert parallel_jobs(launcher, cores) == jobs


def test_threads_per_job():
    joblib2 = {"_target_": JOBLIB, "n_jobs": 2}
    assert choose("auto", joblib2, multirun=True, cores=2) == (1, 2)
    assert choose("auto", {"_target_": JOBLIB, "n_jobs": 3}, multirun=True, cores=16) == (5, 3)
    assert choose("auto", {"_target_": JOBLIB, "n_jobs": 4}, multirun=True, cores=2) == (1, 4)  # never 0
    assert choose("auto", joblib2, multirun=False, cores=2) == (None, None)  # a single run: torch's own choice
    assert choose("auto", {"_target_": BASIC}, multirun=True, cores=2) == (None, None)  # sequential jobs: all cores
    assert choose(3, joblib2, multirun=True, cores=2) == (3, None)  # an explicit number wins


def test_a_bad_threads_value_exits_2_before_any_data(tmp_path):
    proc = run_train(tmp_path / "bad", "threads=-2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: threads=-2 is invalid: auto or an integer >= 1"
