"""One run per run folder: a second `python -m src.train` into a folder that a live run holds is refused (exit 2).

The lock is an `fcntl.flock` on `<run folder>/run.lock`. The OS releases it when the holding process ends, however it
ends (SIGKILL and power loss included), so a killed run never leaves a stale lock; the file only records the PID of
its last holder, for the message. Under DDP only the job's first process takes it: the other ranks of the same job
work in the same folder by design. A process holds one run lock at a time (a multirun in one process moves it from
job to job).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from src.continual.validate import ConfigError

LOCK_FILE = "run.lock"
_held: tuple[Path, int] | None = None  # (run folder, file descriptor) of the lock this process holds


class RunFolderInUse(ConfigError):
    pass


def is_first_process() -> bool:
    """Rank 0 of a job, whoever started it (Lightning's launcher, torchrun, SLURM); True without DDP."""
    return all(int(os.environ.get(name) or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def hold_run_lock(run_dir: Path) -> None:
    """Take `run_dir`'s lock until this process ends (or takes another run's lock); raise `RunFolderInUse`,
    naming the PID holding it, if a live process already does."""
    global _held
    run_dir = Path(run_dir)
    if not is_first_process() or (_held is not None and _held[0] == run_dir):
        return
    release_run_lock()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderInUse(f"run folder {run_dir} is in use by another run (PID {holder}): wait for it to end, "
                             "or choose another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held = (run_dir, fd)


def release_run_lock() -> None:
    global _held
    if _held is not None:
        os.close(_held[1])  # closing the descriptor releases the flock
        _held = None
