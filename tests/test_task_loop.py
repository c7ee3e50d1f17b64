"""The task loop: exact training length per task, what each task trains on, optimizer resets, checkpoints and
the results file. In-process runs on a small synthetic dataset, built from the real config."""

import json
import math

import lightning as L
import pytest
import torch

from src.methods.base import Regularizer
from tests.helpers import SYNTHETIC, build_loop


class BatchRecorder(L.Callback):
    def __init__(self):
        self.by_task = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        _, _, task_ids = batch
        self.by_task.setdefault(module.current_task, []).append(sorted(set(task_ids.tolist())))


def run_with_recorder(tmp_path, *overrides):
    loop = build_loop(tmp_path, *SYNTHETIC, *overrides)
    recorder = BatchRecorder()
    loop.trainer.callbacks.append(recorder)
    return loop, loop.run(), recorder


@pytest.mark.parametrize("epochs", [1, 2])
def test_each_task_trains_exactly_its_epochs(tmp_path, epochs):
    loop, results, recorder = run_with_recorder(tmp_path, f"trainer.max_epochs={epochs}", "dataset.batch_size=32")
    per_task = [math.ceil(len(task.train_index) / 32) * epochs for task in loop.dm.task_list]
    assert results["steps_per_task"] == per_task
    assert [len(recorder.by_task[t]) for t in range(5)] == per_task
    assert loop.trainer.current_epoch == 5 * epochs


def test_each_task_trains_exactly_its_steps_across_epoch_boundaries(tmp_path):
    # 90 samples per task / batch 32 = 3 batches per epoch; 7 steps spans epochs and ends mid-epoch
    loop, results, recorder = run_with_recorder(tmp_path, "trainer.max_steps=7", "dataset.batch_size=32")
    assert results["steps_per_task"] == [7] * 5
    assert [len(recorder.by_task[t]) for t in range(5)] == [7] * 5
    assert loop.trainer.global_step == 35


def test_finetune_trains_on_the_current_task_only_and_joint_on_all_seen(tmp_path):
    _, _, finetune = run_with_recorder(tmp_path / "f", "trainer.max_steps=4")
    assert all(batch == [t] for t in range(5) for batch in finetune.by_task[t])
    _, _, joint = run_with_recorder(tmp_path / "j", "trainer.max_steps=20", "method=joint")
    for t in range(5):
        seen = {task for batch in joint.by_task[t] for task in batch}
        assert seen == set(range(t + 1))


class OptimizerProbe(L.Callback):
    def __init__(self):
        self.first_step_counts = []

    def on_train_start(self, trainer, module):
        state = trainer.optimizers[0].state
        steps = [float(s["step"]) for s in state.values()] if state else [0.0]
        self.first_step_counts.append(max(steps))


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_at_task_boundaries_is_a_choice(tmp_path, reset):
    loop = build_loop(tmp_path, *SYNTHETIC, "trainer.max_steps=3", f"reset_optimizer={str(reset).lower()}")
    probe = OptimizerProbe()
    loop.trainer.callbacks.append(probe)
    loop.run()
    assert probe.first_step_counts == ([0.0] * 5 if reset else [0.0, 3.0, 6.0, 9.0, 12.0])


def test_results_file_schema_and_checkpoints(tmp_path):
    loop = build_loop(tmp_path, *SYNTHETIC, "trainer.max_steps=3", "checkpoint.keep_every_task=true", "plots=true")
    loop.run()
    run_dir = loop.run_dir
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("status", "config", "acc_matrix", "random_init_acc", "avg_acc", "avg_acc_per_step", "forgetting",
                "bwt", "fwt", "task_times_s", "val_acc_matrix", "val_avg_acc", "task_classes", "steps_per_task"):
        assert key in results, key
    assert results["status"] == "finished" and results["error"] is None
    R = results["acc_matrix"]
    assert len(R) == 5 and all(len(row) == 5 and all(0.0 <= a <= 1.0 for a in row) for row in R)
    assert len(results["random_init_acc"]) == 5 and len(results["task_times_s"]) == 5
    assert results["config"]["trainer"]["max_steps"] == 3
    assert results["tasks"]["type"] == "ClassSplit" and results["tasks"]["class_order"] == list(range(10))
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {f"task_{t}.ckpt" for t in range(5)} | {"last.ckpt"}
    ckpt = torch.load(run_dir / "checkpoints" / "task_2.ckpt", weights_only=False)
    assert ckpt["continual"]["phase"] == "done" and ckpt["continual"]["task"] == 2
    assert len(ckpt["continual"]["results"]["acc_matrix"]) == 3 and "rng" in ckpt["continual"]
    assert "regularizer" in ckpt and ckpt["optimizer_states"]
    assert (run_dir / "acc_matrix.png").stat().st_size > 0 and (run_dir / "avg_acc.png").stat().st_size > 0
    assert not [p for p in run_dir.rglob("*.tmp")]


class FailsAtTask(Regularizer):
    def on_task_end(self, task, module, datamodule):
        if task == 1:
            raise RuntimeError("boom in task 1")


def test_a_crash_marks_the_run_failed_and_keeps_what_was_done(tmp_path):
    loop = build_loop(tmp_path, *SYNTHETIC, "trainer.max_steps=2", "checkpoint.keep_every_task=true")
    loop.module.regularizer = FailsAtTask()
    with pytest.raises(RuntimeError, match="boom"):
        loop.run()
    results = json.loads((loop.run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "boom in task 1" in results["error"]
    assert len(results["acc_matrix"]) == 1
    assert (loop.run_dir / "checkpoints" / "task_0.ckpt").exists()
