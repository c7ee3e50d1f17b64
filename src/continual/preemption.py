"""Stop cleanly on SIGTERM, SIGINT and SIGUSR1: checkpoint the current step, say so in results.json, exit 128 + n.

A scheduler (SLURM at its time limit or on pre-emption, a sweep being cancelled, Ctrl-C) stops a run by a signal.
Stopping *inside* a signal handler would catch the run at an arbitrary point (half an optimizer step, half a Fisher),
so the handler only records the signal; the run stops at the next safe point, where its state is one that
`resume=<run folder>` continues exactly:

- inside a task (`StopOnSignal`, src/continual/checkpointing.py): after an optimizer step, as a mid-task checkpoint does (at an epoch's end
  rather than after its last batch, whose checkpoint Lightning would restore one epoch too far on);
- between tasks (`TaskLoop`): once the finished task's end (the Fisher, the evaluation) and its checkpoint are done.
  A signal during the task end or during a checkpoint write therefore waits for them: a checkpoint is never cut.

Before the task loop runs (imports, config, data) there is nothing to save: the handler stops the run at once.
A second SIGINT (Ctrl-C twice) while the first waits for its safe point stops at once, keeping the newest checkpoint;
other repeats are ignored (a DDP rank may get SIGTERM twice: from SLURM and forwarded by Lightning's launcher).
Under DDP every rank stops at the same step: each safe point takes the signal any rank has recorded (an all-reduce;
rank 0 forwards SIGTERM to the ranks Lightning's launcher started, SLURM signals every rank itself). While Lightning
fits or tests, our SIGTERM handler stands alone (`keep_lightning_off_sigterm`). Inside a SLURM job whose environment
has auto_requeue on, a stop on its requeue signal (SIGUSR1) ends with the job requeued (src/continual/requeue.py).
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """The run stopped on a signal; the entry point exits with `exit_code` (128 + the signal's number). A
    BaseException, as KeyboardInterrupt is: no `except Exception` on the way may swallow it."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}{detail}")


class Preemption:
    """Records the first of `SIGNALS`; `deferred()` is the part of the run where stopping waits for a safe point."""

    def __init__(self):
        self.received: int | None = None
        self._deferring = False
        self.previous: dict = {}  # the handlers `install` replaced, restored by `stops_on_signal`

    def install(self, signals=SIGNALS) -> None:
        for signum in signals:
            self.previous.setdefault(signum, signal.signal(signum, self._on_signal))

    def _on_signal(self, signum, frame) -> None:
        if not self._deferring:
            self.received = signum
            raise Interrupted(signum)
        if self.received is not None:  # SIGTERM may come twice (SLURM, then Lightning forwarding it to its ranks)
            if signum == signal.SIGINT == self.received:
                raise Interrupted(signum, " (twice: stopped at once)")
            return
        self.received = signum
        print(f"{signal.Signals(signum).name} received: stopping at the next safe point"
              f"{' (Ctrl-C again: at once)' if signum == signal.SIGINT else ''}", file=sys.stderr, flush=True)

    @contextmanager
    def deferred(self):
        previous, self._deferring = self._deferring, True
        try:
            yield self
        finally:
            self._deferring = previous

    def agreed(self, trainer=None) -> int | None:
        """The signal to stop on now, the same on every DDP rank (the highest number any rank has recorded)."""
        received = self.received or 0
        if trainer is not None and trainer.world_size > 1:
            import torch

            flag = torch.tensor(received, device=trainer.strategy.root_device)
            received = int(trainer.strategy.reduce(flag, reduce_op="max"))
        return received or None


PREEMPTION = Preemption()  # signals are per process: one recorder per process


def keep_lightning_off_sigterm(trainer) -> None:
    """Make our handler the only SIGTERM handler while Lightning runs (called as each fit or test starts).

    At each fit/test Lightning (2.6) puts its own handler in front of ours; under DDP that handler runs a collective
    (a broadcast) from inside the signal handler, wherever each rank happens to be in its step, so the ranks'
    collectives pair up wrongly (a gradient all-reduce meets a broadcast: the weights silently differ). Ours only
    records the signal; like Lightning's, it first forwards the signal to the processes Lightning's launcher
    started. Lightning puts the handler it found (ours) back when the fit ends."""
    import threading

    if signal.SIGTERM not in PREEMPTION.previous or threading.current_thread() is not threading.main_thread():
        return  # our handler is not installed (a TaskLoop used in-process): leave Lightning's
    launcher = getattr(trainer.strategy, "launcher", None)

    def on_sigterm(signum, frame):
        if launcher is not None and PREEMPTION.received is None:
            launcher.kill(signum)
        PREEMPTION._on_signal(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def interrupted_by_lightning(err: BaseException) -> bool:
    """Lightning's own SIGTERM handling raises `SIGTERMException` (a `SystemExit` with code None: exit 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(err, SIGTERMException)


def stops_on_signal(main):
    """Wrap the entry point: record the signals for its whole run and turn `Interrupted` into one line on stderr
    and exit 128 + n (as a shell reports a process that a signal ended)."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        PREEMPTION.received, PREEMPTION.previous = None, {}
        PREEMPTION.install()
        try:
            return main(*args, **kwargs)
        except Interrupted as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
        finally:
            for signum, handler in PREEMPTION.previous.items():
                signal.signal(signum, handler)
            PREEMPTION.previous = {}

    return wrapper
