"""A run folder never loses its record: a refused `resume=` changes nothing and a missing folder is never created;
`resume=<folder>` alone continues with the run's own config and keeps its logs (every step exactly once after a
SIGKILL); a run that fails before training leaves a results.json that says why."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SYNTHETIC, read_results, run_train

# 3 tasks of 7 steps, a per-step log; every_n_steps is set per test
RUN = (*SYNTHETIC, "+dataset.source.n_test=20", "dataset.tasks.n_tasks=3", "trainer.max_steps=7",
       "trainer.log_every_n_steps=1", "dataset.batch_size=16", "deterministic=true", "method=lwf",
       "logger=[csv,tensorboard]")


def train(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """`python -m src.train <args>` exactly as given (no helper overrides), from `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the hash of its bytes (folders: 'dir')."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def killed_run(folder: Path, marker: Path, step: int, *overrides: str) -> None:
    """Start a run in `folder` and SIGKILL it once its global step reaches `step` (tests/kill_at_step.py)."""
    proc = train(f"hydra.run.dir={folder}", "callbacks=none", *RUN, *overrides,
                 "+callbacks.kill._target_=tests.kill_at_step.KillAtStep", f"+callbacks.kill.step={step}",
                 f"+callbacks.kill.marker={marker}")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert read_results(folder)["status"] == "running"


def csv_rows(folder: Path) -> list[dict]:
    with open(folder / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, never killed."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    proc = train(f"hydra.run.dir={folder}", "callbacks=none", *RUN, "checkpoint.every_n_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def finished(reference) -> Path:
    return reference


def test_a_refused_resume_leaves_the_run_folder_byte_for_byte_unchanged(finished, tmp_path):
    before = snapshot(finished)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log"} <= before.keys()
    # every difference at once, in one line; even with Hydra's own folder pointed at the run
    proc = train(f"resume={finished}", f"hydra.run.dir={finished}", "seed=5", "method=ewc", "trainer.max_steps=3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: resume='{finished}' is invalid: that run was made with ")
    for made, now in (("seed=0", "seed=5"), ("method='lwf'", "method='ewc'"), ("trainer.max_steps=7",
                                                                              "trainer.max_steps=3")):
        assert made in lines[0].split("; this command has")[0] and now in lines[0].split("; this command has")[1]
    assert "method.alpha" not in lines[0]  # a group chosen differently is one entry
    # a value the validation refuses, given beside resume=, is refused too (it differs from the run's)
    proc = train(f"resume={finished}", "dataset.batch_size=0")
    assert proc.returncode == 2 and "dataset.batch_size=0" in proc.stderr.strip().splitlines()[-1]
    assert snapshot(finished) == before


def test_resume_of_a_missing_folder_creates_nothing(tmp_path):
    missing = tmp_path / "runs" / "nope"
    proc = train(f"resume={missing}", cwd=tmp_path)  # from a folder where Hydra's default outputs/ would go
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: resume='{missing}' is invalid: {missing} is not a run folder "
                                                "(it has no config.yaml)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("every_n_steps", "kill_at", "resumed_from"), [
    (3, 11, "task 2, at step 9"),            # a checkpoint inside task 2, rows for steps 9 and 10 were logged after it
    (0, 10, "task 1, after its"),      # the checkpoint after task 1 (step 7); task 2's first rows came after it
])
def test_resume_alone_continues_the_run_and_its_logs_after_a_sigkill(reference, tmp_path, every_n_steps, kill_at,
                                                                      resumed_from):
    folder = tmp_path / "run"
    killed_run(folder, tmp_path / "killed", kill_at, f"checkpoint.every_n_steps={every_n_steps}")
    before = snapshot(folder)
    log_before = (folder / "train.log").read_text()
    steps_before_kill = {int(r["step"]) for r in csv_rows(folder) if "train/loss" in r}
    assert steps_before_kill == set(range(kill_at - 1))  # written as logged: nothing lost to the kill

    proc = train(f"resume={folder}")  # nothing else: the run's own config
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Previous log files" not in proc.stderr

    # the run's records are kept; the resume invocation is recorded beside them
    after = snapshot(folder)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "config.yaml"):
        assert after[name] == before[name], name
    log = (folder / "train.log").read_text()
    assert log.startswith(log_before) and f"resuming from {folder}/checkpoints/last.ckpt: {resumed_from}" in log
    records = list(folder.glob(".hydra/resumes/*/overrides.yaml"))
    assert len(records) == 1 and f"resume={folder}" in records[0].read_text()

    results, expected = read_results(folder), read_results(reference)
    assert results["status"] == "finished" and results["config"]["method"] == expected["config"]["method"]
    assert results["acc_matrix"] == expected["acc_matrix"]

    # the CSV log: the rows from before the kill kept, each step exactly once, as in the run never killed
    assert csv_rows(folder) == csv_rows(reference)

    # TensorBoard: the same folder, a new event file; the old one's events after the checkpoint are hidden
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(21))
    assert [e.step for e in events.Scalars("eval/acc_task_0")] == [7, 14, 21]
    assert {p.parent.name for p in folder.rglob("events.out.tfevents.*")} == {"tensorboard"}


def test_a_run_that_fails_before_training_says_why_in_results_json(tmp_path):
    folder = tmp_path / "run"
    proc = run_train(folder, *SYNTHETIC, "trainer.max_steps=-5", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: trainer.max_steps=-5 is invalid")
    results = read_results(folder)
    assert results["status"] == "failed" and f"error: {results['error']}" == lines[-1]
    assert results["config"]["trainer"]["max_steps"] == -5


def test_a_refused_ckpt_path_records_the_failure_in_the_new_folder_only(finished, tmp_path):
    before = snapshot(finished)
    proc = run_train(tmp_path / "new", "method=lwf", f"ckpt_path={finished}/checkpoints/last.ckpt", check=False)
    assert proc.returncode == 2 and "that run was made with" in proc.stderr.strip().splitlines()[-1]
    assert read_results(tmp_path / "new")["status"] == "failed"
    assert snapshot(finished) == before
    assert json.loads((finished / "results.json").read_text())["status"] == "finished"


def test_a_new_metrics_column_rewrites_metrics_csv_whole_or_not_at_all(tmp_path, monkeypatch):
    """A new column (a task's first evaluation, EWC's Fisher statistics) makes the CSV logger write metrics.csv again
    with the wider header: every row kept, and a failure meanwhile leaves the old file as it was."""
    from src.continual.loggers import ContinuingCSVLogger

    logger = ContinuingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    path = Path(logger.experiment.metrics_file_path)
    before = path.read_text()
    original = csv.DictWriter.writerows

    def fail(self, rows):  # the new header is written, then the rows fail
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", fail)
    with pytest.raises(OSError, match="disk full"):
        logger.log_metrics({"eval/acc_task_0": 0.9}, step=1)
    assert path.read_text() == before
    monkeypatch.setattr(csv.DictWriter, "writerows", original)
    logger.experiment.metrics = []  # the failed row, as a killed run would not have it either
    logger.log_metrics({"eval/acc_task_1": 0.8}, step=2)
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["eval/acc_task_1"]) for r in rows] == [
        ("0", "1.0", ""), ("1", "0.5", ""), ("2", "", "0.8")]
