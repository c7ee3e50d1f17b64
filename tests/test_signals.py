"""SIGTERM, SIGINT and SIGUSR1 through `python -m src.train`: the run checkpoints the current step at a safe point,
results.json says `interrupted` and names the signal, the process exits 128 + n, and `resume=` ends exactly where an
uninterrupted run ends (deterministic=true). The signals are real signals the run sends itself at a chosen point
(a callback or the method below, switched on per run), so every test hits the point it names."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L
import pytest
import torch

from src.methods.ewc import EWC
from tests.helpers import SYNTHETIC, read_results, run_train

# 3 tasks of 7 steps; dropout makes the RNG state matter; EWC gives the task end a Fisher and state to save
COMMON = (*SYNTHETIC, "+dataset.source.n_test=20", "dataset.batch_size=16", "deterministic=true", "model.dropout=0.3",
          "trainer.max_steps=7", "+dataset.source.n_classes=6", "dataset.tasks.n_tasks=3", "logger=none",
          "method=ewc", "method._target_=tests.test_signals.SignalAtTaskEnd")


def signal_at(step: int, name: str, hook: str = "batch") -> tuple[str, ...]:
    return ("+callbacks.signal._target_=tests.test_signals.SignalAtStep", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.name={name}", f"+callbacks.signal.hook={hook}")


class SignalAtStep(L.Callback):
    """Send this process `name` once, at the start of the batch that begins at global step `step` (hook=batch),
    or in the middle of the first checkpoint written at or after it (hook=checkpoint)."""

    def __init__(self, step: int, name: str, hook: str = "batch"):
        self.step, self.signum, self.hook, self.sent = step, getattr(signal, name), hook, False

    def _send(self, trainer) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            if trainer.global_rank == 0:  # as `kill <pid>` does; under DDP Lightning forwards SIGTERM to the ranks
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, *args):
        if self.hook == "batch":
            self._send(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # inside trainer.save_checkpoint
        if self.hook == "checkpoint":
            self._send(trainer)


class SignalAtTaskEnd(EWC):
    """EWC that sends itself SIGTERM as its Fisher starts after task `$SIGNAL_AT_TASK_END` (unset: plain EWC)."""

    def on_task_end(self, task, module, datamodule):
        if os.environ.get("SIGNAL_AT_TASK_END") == str(task):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().on_task_end(task, module, datamodule)


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def assert_interrupted(proc, run_dir, signum):
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    name = signal.Signals(signum).name
    assert proc.stderr.strip().splitlines()[-1] == f"error: interrupted by {name}"
    results = read_results(run_dir)
    assert results["status"] == "interrupted" and results["error"] == f"interrupted by {name}"
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary file left behind


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, *COMMON)
    return run_dir


def assert_same_results(run_dir, reference_dir):
    resumed, expected = read_results(run_dir), read_results(reference_dir)
    assert resumed["status"] == "finished"
    for key in ("acc_matrix", "random_init_acc", "avg_acc", "bwt", "steps_per_task"):
        assert resumed[key] == expected[key], key
    a, b = checkpoint(run_dir), checkpoint(reference_dir)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert_equal_state(a["regularizer"], b["regularizer"])  # EWC's Fishers and anchors, tensor by tensor


def assert_equal_state(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_equal_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    # other leaves: statistics, among them the Fisher's wall time


def test_a_default_run_keeps_only_last_ckpt(reference):
    assert [p.name for p in (reference / "checkpoints").iterdir()] == ["last.ckpt"]


def test_sigterm_mid_task_checkpoints_the_step_exits_143_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, *signal_at(10, "SIGTERM"), check=False)  # step 10: inside task 1
    assert_interrupted(proc, run_dir, signal.SIGTERM)
    saved = checkpoint(run_dir)
    assert saved["continual"]["phase"] == "training" and saved["global_step"] == 11  # the step the signal hit
    assert f"resume={run_dir}" in proc.stdout + proc.stderr  # how to continue
    resumed = run_train(run_dir, *COMMON, f"resume={run_dir}", "+callbacks.signal.step=1000000")  # its saved overrides hold the signal: move it past the end
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert_same_results(run_dir, reference)


def test_sigterm_during_the_fisher_lets_the_task_end_finish_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SIGNAL_AT_TASK_END": "0"}
    proc = run_train(run_dir, *COMMON, check=False, env=env)
    assert_interrupted(proc, run_dir, signal.SIGTERM)
    saved = checkpoint(run_dir)
    assert (saved["continual"]["phase"], saved["continual"]["task"]) == ("done", 0)  # task 0 ended in full
    assert len(read_results(run_dir)["acc_matrix"]) == 1
    run_train(run_dir, *COMMON, f"resume={run_dir}")
    assert_same_results(run_dir, reference)


def test_sigterm_during_the_last_tasks_end_finishes_the_run_with_complete_results(tmp_path, reference):
    """The results are complete then: the run writes them (atomically) and ends as if uninterrupted, exit 0."""
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, check=False, env={**os.environ, "SIGNAL_AT_TASK_END": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM received: stopping at the next safe point" in proc.stderr
    assert_same_results(run_dir, reference)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".results.json")]  # no temporary file left


@pytest.mark.parametrize(("name", "step"), [("SIGINT", 3), ("SIGUSR1", 16)])
def test_sigint_and_sigusr1_mid_task(tmp_path, name, step):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, *signal_at(step, name), check=False)
    assert_interrupted(proc, run_dir, getattr(signal, name))
    saved = checkpoint(run_dir)
    assert saved["continual"]["phase"] == "training" and saved["global_step"] == step + 1
    assert saved["continual"]["task"] == step // 7


def test_a_signal_during_a_checkpoint_write_waits_for_the_write(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, "checkpoint.every_n_steps=4", *signal_at(4, "SIGTERM", "checkpoint"),
                     check=False)
    assert_interrupted(proc, run_dir, signal.SIGTERM)
    # the write that the signal hit completes (and is loadable); it holds the step the run stopped at (the stop
    # check runs after that checkpoint, at the same step)
    saved = checkpoint(run_dir)
    assert saved["continual"]["phase"] == "training" and saved["global_step"] == 4


DDP = ("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "dataset.tasks.n_tasks=2")


@pytest.mark.slow
def test_sigterm_under_ddp_stops_both_ranks_and_resumes_exactly(tmp_path):
    """2 gloo processes; SIGTERM to the launching process (rank 0) mid-task: Lightning's launcher forwards it to
    rank 1, both stop at the same step (exit 143), and resume= ends as the uninterrupted DDP run."""
    reference = tmp_path / "reference"
    run_train(reference, *COMMON, *DDP)
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, *DDP, *signal_at(10, "SIGTERM"), check=False)
    assert_interrupted(proc, run_dir, signal.SIGTERM)
    saved = checkpoint(run_dir)
    assert saved["continual"]["phase"] == "training" and saved["global_step"] == 11
    assert len(read_results(run_dir)["acc_matrix"]) == 1
    run_train(run_dir, *COMMON, *DDP, f"resume={run_dir}", "+callbacks.signal.step=1000000")
    assert_same_results(run_dir, reference)


def test_a_signal_at_start_up_exits_at_once_with_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *COMMON, "dataset.source._target_=tests.test_signals.SignalWhileLoading",
                     check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted by SIGTERM"
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()


class SignalWhileLoading:
    """A data source that is sent SIGTERM while the run starts (before there is a task loop)."""

    def __init__(self, **_):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the signal stops the run")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
