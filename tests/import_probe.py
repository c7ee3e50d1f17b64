"""A callback that records which modules the run has imported, at its first training step and at the end of each
task (the last record is the run's end): `+callbacks.imports._target_=tests.import_probe.RecordImports
+callbacks.imports.path=<file.json>`. It imports nothing itself beyond what a run has already imported."""

import json
import sys
from pathlib import Path

import lightning as L


class RecordImports(L.Callback):
    def __init__(self, path: str):
        self.path, self.records = Path(path), {}

    def _record(self, when: str) -> None:
        self.records[when] = sorted(sys.modules)
        self.path.write_text(json.dumps(self.records))

    def on_train_batch_start(self, trainer, *args):
        if "first_step" not in self.records:
            self._record("first_step")

    def on_test_end(self, trainer, *args):
        self._record("end")
