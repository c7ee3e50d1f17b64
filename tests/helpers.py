"""Shared test helpers: a synthetic image source and a runner for the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from src.config import compose_config  # noqa: F401  (tests import it from here)
from src.data.source import ImageData
from src.methods.base import Regularizer

ROOT = Path(__file__).resolve().parents[1]
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class SyntheticSource:
    """Small learnable images: each class lights up its own pixel block, plus noise. Usable from Hydra as
    `dataset.source._target_=tests.helpers.SyntheticSource`."""

    def __init__(self, n_classes: int = 10, n_train: int = 100, n_test: int = 20, shape=(1, 8, 8), seed: int = 0,
                 root: str | None = None, **_):
        self.n_classes, self.n_train, self.n_test, self.shape, self.seed = n_classes, n_train, n_test, tuple(shape), seed
        self.input_shape = self.shape

    def _make(self, per_class, generator):
        y = torch.arange(self.n_classes).repeat_interleave(per_class)
        x = torch.randint(0, 60, (len(y), *self.shape), generator=generator, dtype=torch.uint8)
        flat = x.view(len(y), -1)
        block = max(1, flat.shape[1] // self.n_classes)
        for c in range(self.n_classes):
            flat[y == c, c * block : (c + 1) * block] = 255
        return x, y

    def load(self) -> ImageData:
        generator = torch.Generator().manual_seed(self.seed)
        train_x, train_y = self._make(self.n_train, generator)
        test_x, test_y = self._make(self.n_test, generator)
        channels = self.shape[0]
        return ImageData(train_x, train_y, test_x, test_y, self.n_classes, (0.2,) * channels, (0.3,) * channels)


def _finetune_unless_named(overrides):
    """Tests of the machinery run the plain `finetune` method unless they name one (the default is EWC), and draw
    no plots unless they say so (the default draws them: ≈ 1 s a run; tests/test_end_to_end.py checks them)."""
    overrides = list(overrides)
    if not any(o.startswith("plots=") for o in overrides):
        overrides.append("plots=false")
    named = any(o.startswith("method=") for o in overrides)
    return overrides if named else ["method=finetune", *overrides]


def run_train(run_dir: Path, *overrides: str, check: bool = True, timeout: int = 600, env=None):
    """Run `python -m src.train` as a user would, in a subprocess from the project root."""
    cmd = [sys.executable, "-m", "src.train", f"hydra.run.dir={run_dir}", "callbacks=none",
           *_finetune_unless_named(overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def build_loop(tmp_path: Path, *overrides: str):
    """A TaskLoop built in-process from the real config; `.run()` trains, `.module`, `.dm` are inspectable."""
    from src.train import build_task_loop

    run_dir = Path(tmp_path) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose_config("logger=none", "callbacks=none", *_finetune_unless_named(overrides), run_dir=run_dir)
    return build_task_loop(cfg, run_dir)


SYNTHETIC = ("dataset.source._target_=tests.helpers.SyntheticSource", "+dataset.source.n_train=100")


class NaNAtTask(Regularizer):
    """A method whose loss becomes NaN in task `task` (for the non-finite-loss test); usable from Hydra as
    `method._target_=tests.helpers.NaNAtTask`."""

    trains_on_past_tasks = False

    def __init__(self, task: int = 2, **_):
        self.task = task

    def on_task_start(self, task, module, datamodule):
        pass

    def loss(self, module, batch, logits, task_loss):
        if module.current_task == self.task and module.global_step % 3 == 2:
            return {"loss": task_loss * float("nan")}
        return {"loss": task_loss}

    def on_task_end(self, task, module, datamodule):
        pass

    def summary(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def assert_only_the_failure_is_recorded(run_dir, stderr):
    """An early failure leaves no results, only (when Hydra got as far as making the run folder) a results.json
    that says `failed` and why, with the same line as stderr."""
    assert not (Path(run_dir) / "config.yaml").exists()
    if (Path(run_dir) / "results.json").exists():
        results = json.loads((Path(run_dir) / "results.json").read_text())
        assert results["status"] == "failed" and f"error: {results['error']}" == stderr.strip()
        assert "acc_matrix" not in results
