"""Two runs into one run folder: the second is refused with one line (exit 2) naming the folder and the PID holding
it; a run killed with SIGKILL leaves no stale lock; the other ranks of a DDP job do not lock each other out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from src.continual import run_lock
from tests.helpers import ROOT, SYNTHETIC, run_train

HOLD = ("import sys, time; from src.continual.run_lock import hold_run_lock; hold_run_lock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the run folder's lock (as a live run does), killed with SIGKILL at the end."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_a_second_run_into_a_held_folder_is_refused_with_one_line(holder):
    run_dir, proc = holder
    refused = run_train(run_dir, *SYNTHETIC, "trainer.max_steps=1", "logger=none", check=False)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: run folder") and str(run_dir) in line and f"PID {proc.pid}" in line
    assert not (run_dir / "results.json").exists() and not (run_dir / "config.yaml").exists()


def test_a_sigkilled_holder_leaves_no_stale_lock(holder):
    run_dir, proc = holder
    with pytest.raises(run_lock.RunFolderInUse, match=f"PID {proc.pid}"):
        run_lock.hold_run_lock(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / run_lock.LOCK_FILE).exists()  # the file stays; the lock went with the process
    try:
        run_lock.hold_run_lock(run_dir)
        assert (run_dir / run_lock.LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        run_lock.release_run_lock()


def test_a_process_holds_one_run_lock_and_other_ranks_take_none(tmp_path, monkeypatch):
    try:
        run_lock.hold_run_lock(tmp_path / "a")
        run_lock.hold_run_lock(tmp_path / "a")  # the same run again (e.g. its resume in this process): fine
        run_lock.hold_run_lock(tmp_path / "b")  # the next job of a multirun: a's lock is let go
        run_lock.hold_run_lock(tmp_path / "a")
    finally:
        run_lock.release_run_lock()
    for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.setenv(name, "1")
        assert not run_lock.is_first_process()
        run_lock.hold_run_lock(tmp_path / "ddp")  # rank 1 of a job: no lock of its own
        assert not (tmp_path / "ddp").exists()
        monkeypatch.delenv(name)
    assert run_lock.is_first_process()
