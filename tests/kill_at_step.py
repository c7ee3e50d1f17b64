"""A callback that SIGKILLs its own process once, at a given global step: a deterministic `kill -9` mid-task, usable
from Hydra as `+callbacks.kill._target_=tests.kill_at_step.KillAtStep +callbacks.kill.step=N
+callbacks.kill.marker=<file>`. The marker file makes it one-shot: the resumed run (same config) is not killed."""

import os
import signal
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text(str(trainer.global_step))
            os.kill(os.getpid(), signal.SIGKILL)
