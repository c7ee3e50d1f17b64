"""SLURM requeue (src/continual/requeue.py) through `python -m src.train` in a fake SLURM job: SLURM's environment
variables (Lightning then picks its SLURMEnvironment) and an `scontrol` on PATH that records its arguments.

SIGUSR1 mid-task: exit 138, results.json `interrupted` and requeued, `scontrol requeue <job id>`; the same command
again with SLURM_RESTART_COUNT=1 (what SLURM runs after a requeue) continues the run in its folder to the results of
an uninterrupted run, and once more it is a no-op. Without SLURM, with auto_requeue=false, or on SIGTERM: no
requeue. Under DDP (2 gloo processes) SIGTERM mid-task stops both ranks and resume= ends as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest

from src.continual import requeue
from tests.helpers import ROOT, SYNTHETIC, read_results, run_train

# 2 tasks of 6 steps; dropout makes the RNG state matter; EWC gives the task end a Fisher and state to save
COMMON = (*SYNTHETIC, "+dataset.source.n_test=20", "dataset.batch_size=16", "deterministic=true", "model.dropout=0.3",
          "trainer.max_steps=6", "+dataset.source.n_classes=4", "dataset.tasks.n_tasks=2", "logger=none",
          "method=ewc")
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


class SignalOnce(L.Callback):
    """Send this process `name` at the start of the batch that begins at global step `step`, once: a marker file
    keeps the restarted job (the same command) from sending it again."""

    def __init__(self, step: int, name: str, marker: str):
        self.step, self.signum, self.marker = step, getattr(signal, name), Path(marker)

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.step and not self.marker.exists():
            if trainer.global_rank == 0:  # as `kill <pid>`; under DDP Lightning's launcher forwards SIGTERM
                self.marker.write_text(str(trainer.global_step))
                os.kill(os.getpid(), self.signum)


def signal_once(tmp_path, step: int, name: str) -> tuple[str, ...]:
    return ("+callbacks.signal._target_=tests.test_requeue.SignalOnce", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.name={name}", f"+callbacks.signal.marker={tmp_path / 'signal_sent'}")


@pytest.fixture
def fake_slurm(tmp_path):
    """(environment of a SLURM job with a recording `scontrol`, the file holding scontrol's calls)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit "${{FAKE_SCONTROL_EXIT:-0}}"\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return env, calls


def outside_slurm(fake_env):
    return {k: v for k, v in fake_env.items() if not k.startswith("SLURM_")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, *COMMON)
    return read_results(run_dir)


def assert_stopped(proc, run_dir, name):
    signum = getattr(signal, name)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: interrupted by {name}"
    results = read_results(run_dir)
    assert results["status"] == "interrupted" and results["error"] == f"interrupted by {name}"
    return results


@pytest.mark.slow
def test_sigusr1_requeues_the_job_and_the_restarted_job_continues_the_run_exactly(tmp_path, fake_slurm, reference):
    env, calls = fake_slurm
    run_dir = tmp_path / "run"
    command = (run_dir, *COMMON, *signal_once(tmp_path, 8, "SIGUSR1"))  # step 8: inside task 1
    proc = run_train(*command, check=False, env=env)
    results = assert_stopped(proc, run_dir, "SIGUSR1")
    assert calls.read_text() == "requeue 4242\n"
    assert results["requeue"] == {"job_id": "4242", "requeued": True, "scontrol_returncode": 0}
    assert len(results["acc_matrix"]) == 1

    restarted = run_train(*command, env={**env, "SLURM_RESTART_COUNT": "1"})  # what SLURM runs after the requeue
    assert f"continuing the run in {run_dir}" in restarted.stderr
    assert "resuming from" in restarted.stdout + restarted.stderr
    resumed = read_results(run_dir)
    assert resumed["status"] == "finished" and resumed["requeue"] is None
    for key in ("acc_matrix", "random_init_acc", "avg_acc", "bwt", "steps_per_task"):
        assert resumed[key] == reference[key], key
    assert sorted(p.name for p in (run_dir / ".hydra" / "resumes").iterdir())  # recorded as a resume
    assert calls.read_text() == "requeue 4242\n"  # no second requeue

    again = run_train(*command, env={**env, "SLURM_RESTART_COUNT": "2"})  # a finished run: nothing to do
    assert "already finished; nothing to do" in again.stdout + again.stderr
    assert read_results(run_dir) == resumed


@pytest.mark.slow
def test_a_restarted_run_in_a_folder_named_by_the_time_continues_the_folder_the_requeued_job_noted(
        tmp_path, fake_slurm, reference):
    """The default run folder is named by the time, so the restarted job's is a new name: the requeued job notes its
    folder in outputs/.requeued/<job id> and the restarted run continues that one (and removes the note)."""
    env, calls = fake_slurm
    job = str(900000 + os.getpid() % 100000)  # a job id of this test alone: the note lies under the project's outputs/
    env = {**env, "SLURM_JOB_ID": job}
    note = ROOT / "outputs" / ".requeued" / job
    runs = tmp_path / "runs"
    command = (f"{runs}/" + "${now:%H-%M-%S-%f}", *COMMON, *signal_once(tmp_path, 8, "SIGUSR1"))
    try:
        proc = run_train(*command, check=False, env=env)
        (first,) = runs.iterdir()
        assert assert_stopped(proc, first, "SIGUSR1")["requeue"]["requeued"]
        assert calls.read_text() == f"requeue {job}\n" and note.read_text().strip() == str(first)
        restarted = run_train(*command, env={**env, "SLURM_RESTART_COUNT": "1"})
        assert f"continuing the run in {first}" in restarted.stderr
        assert list(runs.iterdir()) == [first]  # Hydra too wrote into the continued folder, not a new one
        resumed = read_results(first)
        assert resumed["status"] == "finished" and not note.exists()
        for key in ("acc_matrix", "random_init_acc", "avg_acc", "bwt", "steps_per_task"):
            assert resumed[key] == reference[key], key
    finally:
        note.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_restarted_multirun_job_continues_its_job_folder(tmp_path, fake_slurm, reference):
    """`-m` in a batch script with a fixed sweep folder (Hydra's basic launcher): the restarted job finds its job's
    folder `<sweep>/0` again (the submitit launcher's requeued job re-runs its pickled job the same way)."""
    import subprocess

    env, calls = fake_slurm
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep}", "callbacks=none", *COMMON,
           *signal_once(tmp_path, 8, "SIGUSR1")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    results = assert_stopped(proc, sweep / "0", "SIGUSR1")
    assert results["requeue"]["requeued"] and calls.read_text() == "requeue 4242\n"
    restarted = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                               env={**env, "SLURM_RESTART_COUNT": "1"})
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"continuing the run in {sweep / '0'}" in restarted.stderr
    resumed = read_results(sweep / "0")
    assert resumed["status"] == "finished"
    for key in ("acc_matrix", "random_init_acc", "avg_acc", "bwt", "steps_per_task"):
        assert resumed[key] == reference[key], key


@pytest.mark.parametrize("case", ["outside SLURM", "auto_requeue=false", "SIGTERM"])
def test_no_requeue_outside_slurm_when_switched_off_or_on_another_signal(tmp_path, fake_slurm, case):
    env, calls = fake_slurm
    run_dir = tmp_path / "run"
    name = "SIGTERM" if case == "SIGTERM" else "SIGUSR1"
    extra = ("auto_requeue=false",) if case == "auto_requeue=false" else ()
    env = outside_slurm(env) if case == "outside SLURM" else env
    proc = run_train(run_dir, *COMMON, *extra, *signal_once(tmp_path, 2, name), check=False, env=env)
    results = assert_stopped(proc, run_dir, name)
    assert results["requeue"] is None and not calls.exists()
    assert f"resume={run_dir}" in proc.stdout + proc.stderr  # how to continue by hand


def test_a_restarted_job_without_a_run_in_its_folder_starts_afresh_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue.folder_to_continue(tmp_path) is None
    assert "holds no run to continue" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeue.folder_to_continue(tmp_path) == tmp_path.absolute()
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert requeue.folder_to_continue(tmp_path) is None  # a first start: a new run, whatever the folder holds


def test_the_job_id_and_a_failed_requeue(tmp_path, fake_slurm, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env, calls = fake_slurm
    slurm_job(monkeypatch)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("FAKE_SCONTROL_EXIT", "1")
    trainer = SimpleNamespace(is_global_zero=True, _accelerator_connector=SimpleNamespace(
        cluster_environment=SLURMEnvironment()))
    record = requeue.requeue_job(trainer, signal.SIGUSR1)
    assert record == {"job_id": "4240_3", "requeued": False, "scontrol_returncode": 1}
    assert calls.read_text() == "requeue 4240_3\n"
    assert requeue.requeue_job(trainer, signal.SIGTERM) is None
    trainer.is_global_zero = False
    assert requeue.requeue_job(trainer, signal.SIGUSR1) is None  # rank 0 requeues the job


def slurm_job(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("auto_requeue", [True, False])
def test_auto_requeue_is_the_switch_of_the_trainers_slurm_environment(tmp_path, monkeypatch, auto_requeue):
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tests.helpers import compose_config

    cfg = compose_config("trainer=ddp", f"auto_requeue={str(auto_requeue).lower()}", run_dir=tmp_path)
    assert requeue.trainer_plugins(cfg) == {}  # outside SLURM: Lightning's own choice
    slurm_job(monkeypatch)
    plugins = requeue.trainer_plugins(cfg)["plugins"]
    assert [type(p).__name__ for p in plugins] == ["SyncBatchNormAnyDevice", "SLURMEnvironment"]  # ddp's kept
    cfg = compose_config("trainer=cpu", f"auto_requeue={str(auto_requeue).lower()}", run_dir=tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, **requeue.trainer_plugins(cfg))
    env = requeue.cluster_environment(trainer)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is auto_requeue
    assert requeue.requeue_signal(trainer) == (signal.SIGUSR1 if auto_requeue else None)


def test_auto_requeue_is_refused_unless_true_or_false(tmp_path):
    proc = run_train(tmp_path / "run", *COMMON, "auto_requeue=maybe", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: auto_requeue='maybe' is invalid: true or false"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", str(ROOT)]))
