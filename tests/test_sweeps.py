"""Hydra multirun through the real entry point: the basic, joblib and submitit launchers, the Optuna searches, and
the SLURM preset (up to the sbatch script, no cluster needed). Every job must write only into its own folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, SYNTHETIC, read_results, run_train

TINY = (*SYNTHETIC, "dataset.tasks.n_tasks=2", "trainer.max_steps=2", "callbacks=none")


def run_multirun(sweep_dir: Path, *overrides: str, multirun_flag: bool = True, timeout: int = 300):
    cmd = [sys.executable, "-m", "src.train", *(["-m"] if multirun_flag else []), f"hydra.sweep.dir={sweep_dir}",
           *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def compose_with_hydra(*overrides: str):
    """The whole composed config, the `hydra` node included (what Hydra builds launchers and sweepers from)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_jobs_in_own_folders(sweep_dir: Path, seeds: list[int], extra_top_level: set[str] = frozenset()):
    """Job n ran seed n, finished, and everything it wrote is inside `<sweep>/<n>/`."""
    top = {p.name for p in sweep_dir.iterdir()}
    assert top == {"multirun.yaml", *map(str, range(len(seeds))), *extra_top_level}, top
    for num, seed in enumerate(seeds):
        job = sweep_dir / str(num)
        results = read_results(job)
        assert results["status"] == "finished" and results["config"]["seed"] == seed
        assert results["config"]["paths"]["output_dir"] == str(job)
        assert results["config"]["trainer"]["default_root_dir"] == str(job)
        written = files_under(job)
        for name in ("results.json", "config.yaml", "train.log",
                     ".hydra/overrides.yaml", "csv/metrics.csv", "checkpoints/last.ckpt"):
            assert name in written, (job, name)
        assert f"seed={seed}" in (job / ".hydra" / "overrides.yaml").read_text()


def test_basic_launcher_two_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_multirun(sweep_dir, "seed=0,1")
    assert_jobs_in_own_folders(sweep_dir, [0, 1])
    # same config but the seed: different runs (the seed reached the data order and the initialisation)
    r0, r1 = read_results(sweep_dir / "0"), read_results(sweep_dir / "1")
    assert r0["random_init_acc"] != r1["random_init_acc"]
    # the second job, run after the first in the same process, is the run seed=1 makes on its own: no state leaks
    run_train(tmp_path / "alone", *TINY, "seed=1")
    alone = read_results(tmp_path / "alone")
    assert (alone["random_init_acc"], alone["acc_matrix"]) == (r1["random_init_acc"], r1["acc_matrix"])


def test_joblib_launcher_two_parallel_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_multirun(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert_jobs_in_own_folders(sweep_dir, [0, 1])
    for job in (0, 1):  # threads: auto gives each job cores ÷ n_jobs threads, intra-op and inter-op
        threads = read_results(sweep_dir / str(job))["threads"]
        expected = max(1, threads["cores"] // 2)
        assert (threads["parallel_jobs"], threads["intra_op"], threads["inter_op"]) == (2, expected, expected), threads
        assert threads["imports_preloaded"]  # sweep_workers=forkserver: forked from a server that imported them once
    # joblib's own fresh workers import everything themselves, and compute the same numbers
    loky_dir = tmp_path / "loky"
    run_multirun(loky_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", "sweep_workers=loky")
    for job in (0, 1):
        forked, fresh = read_results(sweep_dir / str(job)), read_results(loky_dir / str(job))
        assert not fresh["threads"]["imports_preloaded"]
        assert (forked["random_init_acc"], forked["acc_matrix"]) == (fresh["random_init_acc"], fresh["acc_matrix"])


def test_the_sweep_worker_preload_imports_what_a_run_needs_and_a_bad_choice_is_one_line(tmp_path):
    code = ("import sys; import src.continual.preload; "
            "print(all(m in sys.modules for m in ('torch', 'torch._dynamo', 'lightning', 'src.continual.task_loop')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    proc = run_train(tmp_path / "bad", "sweep_workers=fork", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: sweep_workers='fork' is invalid: one of forkserver, loky"


def test_submitit_local_launcher_one_job(tmp_path):
    """submitit_local goes through submitit's executor (pickled job, separate process, result file) like SLURM."""
    sweep_dir = tmp_path / "sweep"
    run_multirun(sweep_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=3")
    assert_jobs_in_own_folders(sweep_dir, [3], extra_top_level={".submitit"})
    assert list((sweep_dir / ".submitit").rglob("*_result.pkl"))


def test_optuna_search_three_trials_maximises_the_returned_objective(tmp_path):
    """The ready EWC search (no -m needed: it sets hydra.mode) cut to 3 trials; Optuna gets the value `main`
    returns (validation average accuracy) and keeps the best."""
    sweep_dir = tmp_path / "sweep"
    run_multirun(sweep_dir, "hparams_search=ewc_lambda", "hydra.sweeper.n_trials=3",
                 "hydra.sweeper.sampler.n_startup_trials=2", "logger=none", "save_checkpoints=false",
                 multirun_flag=False)
    trials = [read_results(sweep_dir / str(n)) for n in range(3)]
    assert all(t["status"] == "finished" and t["method"] == "ewc" for t in trials)
    lambdas = [t["config"]["method"]["lambda"] for t in trials]
    assert len(set(lambdas)) == 3 and all(1.0 <= lam <= 1e6 for lam in lambdas)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    objectives = [t["val_avg_acc"] for t in trials]
    assert best["best_value"] == pytest.approx(max(objectives))
    assert best["best_params"]["method.lambda"] in [
        lam for lam, value in zip(lambdas, objectives, strict=True) if value == pytest.approx(max(objectives))
    ]


@pytest.mark.parametrize("search, keys", [("ewc_lambda", ["lambda"]), ("lwf", ["alpha", "temperature"])])
def test_searches_tune_keys_of_their_method(search, keys):
    method = "ewc" if search == "ewc_lambda" else "lwf"
    if not (ROOT / "conf" / "method" / f"{method}.yaml").is_file():
        pytest.skip(f"conf/method/{method}.yaml is not there yet")
    cfg = compose_with_hydra(f"hparams_search={search}")
    assert cfg.hydra.sweeper.direction == "maximize" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert sorted(cfg.hydra.sweeper.params) == sorted(f"method.{k}" for k in keys)
    for key in keys:
        assert key in cfg.method, f"method.{key} is not a key of conf/method/{method}.yaml"
    assert cfg.dataset.val_fraction > 0  # tuned on validation data


class _Submitted(Exception):
    pass


def test_slurm_preset_makes_the_sbatch_script(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` through the real submitit plugin up to the sbatch script (no cluster here)."""
    import submitit
    from hydra.utils import instantiate

    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                             "hydra.launcher.partition=big", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)  # as Hydra does: from the whole config (the preset reads trainer.*)
    launcher.config = cfg
    captured = {}

    def fake_map_array(self, fn, *iterables):
        captured["sbatch"] = self._executor._make_submission_file_text("python -m src.train", "0")
        raise _Submitted

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun is there"
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    with pytest.raises(_Submitted):
        launcher.launch([["seed=0"]], initial_job_idx=0)
    sbatch = captured["sbatch"]
    for line in ("--partition=big", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=240",
                 "--cpus-per-task=8", "--mem=64GB", "--signal=USR1@120"):
        assert f"#SBATCH {line}" in sbatch, (line, sbatch)


def test_a_bad_job_fails_alone_and_the_sweep_exits_non_zero(tmp_path):
    """`method.lambda=-1` fails with its one line and a results.json that says why; the job after it runs to the end
    (a SystemExit would have ended the sweep at the bad job); the sweep exits 1."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "method=ewc",
           "method.lambda=-1,10"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = "error: method.lambda=-1 is invalid: a number >= 0"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert line in proc.stderr.splitlines()
    assert [read_results(sweep_dir / str(n))["status"] for n in range(2)] == ["failed", "finished"]
    assert f"error: {read_results(sweep_dir / '0')['error']}" == line
    assert read_results(sweep_dir / "1")["config"]["method"]["lambda"] == 10
