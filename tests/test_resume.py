"""A killed run continues exactly: crash at any point, resume from the last checkpoint, and end with the same
weights and results as an uninterrupted run (deterministic=true on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from src.methods.finetune import Finetune
from tests.helpers import FMNIST_SYSTEM_DIR, ROOT, SYNTHETIC, build_loop, read_results, run_train

METHODS = [m for m in ("finetune", "ewc", "lwf") if (ROOT / "conf" / "method" / f"{m}.yaml").exists()]
# dropout makes the RNG state matter; 180 training samples per task in batches of 16 = 12 batches per epoch
COMMON = (*SYNTHETIC, "+dataset.source.n_test=20", "dataset.batch_size=16", "deterministic=true",
          "model.dropout=0.3", "checkpoint.every_n_steps=2")


class CrashAtStep(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step >= self.step:  # a batch takes several steps with steps_per_batch > 1
            raise RuntimeError("simulated crash")


class CrashAtTaskStart(Finetune):
    def on_task_start(self, task, module, datamodule):
        if task == 2:
            raise RuntimeError("simulated crash")


def final_state(run_dir: Path):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]  # after task 4


def assert_same_run(resumed, reference, resumed_dir, reference_dir):
    for key in ("acc_matrix", "random_init_acc", "val_acc_matrix", "avg_acc", "forgetting", "bwt", "fwt",
                "steps_per_task"):
        assert resumed[key] == reference[key], key
    a, b = final_state(resumed_dir), final_state(reference_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def crash_and_resume(tmp_path, overrides, crash_callback=None, crash_regularizer=None):
    reference_loop = build_loop(tmp_path / "ref", *COMMON, *overrides)
    reference = reference_loop.run()
    loop = build_loop(tmp_path / "crashed", *COMMON, *overrides)
    if crash_callback is not None:
        loop.trainer.callbacks.append(crash_callback)
    if crash_regularizer is not None:
        loop.module.regularizer = crash_regularizer
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run()
    assert json.loads((loop.run_dir / "results.json").read_text())["status"] == "failed"
    last = loop.run_dir / "checkpoints" / "last.ckpt"
    phase = torch.load(last, weights_only=False)["continual"]["phase"]
    resumed = build_loop(tmp_path / "crashed", *COMMON, *overrides).run(resume_from=last)
    assert resumed["status"] == "finished"
    assert_same_run(resumed, reference, loop.run_dir, reference_loop.run_dir)
    return phase


@pytest.mark.parametrize("step", [3, 14, 21])  # mid-epoch, a task's last step (7 steps per task), next task
def test_resume_mid_task_by_steps(tmp_path, step):
    phase = crash_and_resume(tmp_path, ["trainer.max_steps=7"], CrashAtStep(step))
    assert phase == "training"


@pytest.mark.parametrize("step", [8, 12, 18, 30])  # epoch 1; its last batch; epoch 2; task 1
def test_resume_mid_task_by_epochs(tmp_path, step):
    phase = crash_and_resume(tmp_path, ["trainer.max_epochs=2"], CrashAtStep(step))
    assert phase == "training"


# steps_per_batch = K: a batch takes up to K steps, so the global step jumps, checkpoints are taken where it crosses
# a multiple of every_n_steps (2 here), and the crash comes after the first batch that reaches the step given
@pytest.mark.parametrize(("k", "length", "step"), [
    (5, "trainer.max_steps=19", 10),   # task 0, first pass; steps 5, 10 | 12 | 17, 19
    (5, "trainer.max_steps=19", 30),   # task 1 (19-38): resumes from step 31, the end of its first pass
    (8, "trainer.max_steps=19", 70),   # task 3 (57-76): resumes from 76, its last batch (7 steps, cut by the budget)
    (5, "trainer.max_epochs=2", 17),   # task 0, epoch 2: steps 17, 22, 24
    (8, "trainer.max_epochs=2", 45),   # task 1's last batch (48, an epoch's last: no checkpoint): resumes from 44
])
def test_resume_mid_task_with_steps_per_batch(tmp_path, k, length, step):
    overrides = [length, "method=lwf", f"steps_per_batch={k}"]
    assert crash_and_resume(tmp_path, overrides, CrashAtStep(step)) == "training"
    one_step_per_batch = build_loop(tmp_path / "k1", *COMMON, length, "method=lwf")  # K-invariant
    assert_same_run(one_step_per_batch.run(), read_results(tmp_path / "ref" / "run"), one_step_per_batch.run_dir,
                    tmp_path / "ref" / "run")


def test_resume_with_steps_per_batch_and_augmentation_is_exact(tmp_path):
    augment = ("+dataset.augment._target_=src.data.augment.RandomCropFlip", "+dataset.augment.padding=1")
    overrides = ["trainer.max_steps=19", "steps_per_batch=5", *augment]
    assert crash_and_resume(tmp_path, overrides, CrashAtStep(27)) == "training"  # resumes at step 29, in task 1


@pytest.mark.parametrize("method", METHODS)
def test_resume_between_tasks(tmp_path, method):
    regularizer = CrashAtTaskStart() if method == "finetune" else None
    if regularizer is None:  # wrap the real method so that it crashes before task 2
        loop_probe = build_loop(tmp_path / "probe", *COMMON, f"method={method}")
        cls = type(loop_probe.module.regularizer)

        class Crashing(cls):
            def on_task_start(self, task, module, datamodule):
                if task == 2:
                    raise RuntimeError("simulated crash")
                return super().on_task_start(task, module, datamodule)

        regularizer = loop_probe.module.regularizer
        regularizer.__class__ = Crashing
    phase = crash_and_resume(tmp_path, ["trainer.max_steps=5", f"method={method}", "checkpoint.every_n_steps=0"],
                             crash_regularizer=regularizer)
    assert phase == "done"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "finetune"])
def test_resume_mid_task_keeps_method_state(tmp_path, method):
    assert crash_and_resume(tmp_path, ["trainer.max_steps=7", f"method={method}"], CrashAtStep(17)) == "training"


def test_resume_keeps_the_carried_optimizer_state(tmp_path):
    crash_and_resume(tmp_path, ["trainer.max_steps=7", "reset_optimizer=false"], CrashAtStep(17))


@pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("method", METHODS)
def test_sigkill_in_the_middle_of_a_task_then_resume_from_the_cli(tmp_path, method):
    common = [f"method={method}", "deterministic=true", "trainer.max_steps=60", "checkpoint.every_n_steps=7",
              "dataset.tasks.n_tasks=3", "logger=none", "checkpoint.keep_every_task=true", "dataset.eval_max_samples=1000",
              *(["method.fisher_samples=1000"] if method == "ewc" else [])]
    reference_dir = tmp_path / "ref"
    run_train(reference_dir, *common)
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", "callbacks=none", *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = run_dir / "checkpoints" / "last.ckpt", time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:  # wait for a mid-task checkpoint of task 2 or later
            ckpt_files = {p.name for p in (run_dir / "checkpoints").glob("task_*.ckpt")} if last.exists() else set()
            if "task_1.ckpt" in ckpt_files and all(
                os.stat(last).st_ino != os.stat(run_dir / "checkpoints" / n).st_ino for n in ckpt_files
            ):
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert read_results(run_dir)["status"] == "running"  # killed: never marked finished
    resume = run_train(run_dir, *common, f"resume={run_dir}")
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert resume.returncode == 0
    assert_same_run(read_results(run_dir), read_results(reference_dir), run_dir, reference_dir)
    again = run_train(tmp_path / "elsewhere", *common, f"resume={run_dir}")
    assert again.returncode == 0 and "already finished" in again.stderr + again.stdout  # a finished run: no-op


def test_resume_refuses_a_folder_that_is_not_a_run_or_another_config(tmp_path):
    proc = run_train(tmp_path / "x", f"resume={tmp_path}", check=False)
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr.splitlines()[-1]
    run_dir = tmp_path / "run"
    run_train(run_dir, *SYNTHETIC, "trainer.max_steps=1", "logger=none")
    proc = run_train(tmp_path / "x", *SYNTHETIC, "trainer.max_steps=1", "logger=none", "seed=5",
                     f"resume={run_dir}", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "seed=0" in last and "seed=5" in last


def test_resume_with_training_augmentation_is_exact(tmp_path):
    augment = ("+dataset.augment._target_=src.data.augment.RandomCropFlip", "+dataset.augment.padding=1")
    crash_and_resume(tmp_path, ["trainer.max_steps=7", *augment], CrashAtStep(17))
