"""A run builds its backbone, and reads a pretrained backbone's weights, once: validation's build (which checks the
model against the dataset's input shape before any data are read) is the one the run trains, and the weights are
those the run would have built itself."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from src.models.hf_backbone import build_hf_backbone
from tests.helpers import SYNTHETIC, build_loop, compose_config, read_results, run_train
from tests.test_hf import OFFLINE
from tests.test_signals import signal_at
from tests.test_text_data import make_task_folders, tiny_bert  # noqa: F401 (fixture)


def counted_hf_backbone(*args, **kwargs):
    """build_hf_backbone that appends a line per build, and one per weights load, to $COUNT_BUILDS."""
    from transformers import AutoModel

    original = AutoModel.from_pretrained.__func__
    with open(os.environ["COUNT_BUILDS"], "a") as log:
        log.write("build\n")

    def counting(cls, *a, **k):
        with open(os.environ["COUNT_BUILDS"], "a") as log:
            log.write("load\n")
        return original(cls, *a, **k)

    AutoModel.from_pretrained = classmethod(counting)
    try:
        return build_hf_backbone(*args, **kwargs)
    finally:
        AutoModel.from_pretrained = classmethod(original)


def _counts(path: Path) -> dict:
    lines = path.read_text().split() if path.exists() else []
    return {"build": lines.count("build"), "load": lines.count("load")}


@pytest.mark.slow
def test_a_run_through_the_entry_point_builds_and_loads_the_backbone_once(tiny_bert, tmp_path):  # noqa: F811
    """`python -m src.train` (validation, then the run), and `resume=` (the resume check, main's validation, the
    run): one build and one weights load per process."""
    tasks = make_task_folders(tmp_path / "tasks", n_tasks=2, n_train=16, n_test=4)
    count = tmp_path / "count"
    env = {**OFFLINE, "COUNT_BUILDS": str(count)}
    args = ("model=hf", f"model.name={tiny_bert}", "model._target_=tests.test_build_once.counted_hf_backbone",
            "dataset=text_files", f"dataset.source.root={tasks}", "dataset.max_length=8", "dataset.batch_size=8",
            "logger=none", "trainer.max_steps=2", "deterministic=true")
    run = tmp_path / "run"
    proc = run_train(run, *args, *signal_at(3, "SIGTERM"), check=False, env=env, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert _counts(count) == {"build": 1, "load": 1}
    count.unlink()
    run_train(run, *args, f"resume={run}", "+callbacks.signal.step=1000000", env=env, timeout=300)
    assert read_results(run)["status"] == "finished"
    assert _counts(count) == {"build": 1, "load": 1}


def test_the_validated_backbone_is_the_one_the_run_would_build(tmp_path, monkeypatch):
    """In-process: validation's backbone is handed to the task loop (one build), with the weights and the RNG state
    a build inside the run gives; a config that changed after validation gets its own build."""
    import src.continual.validate as validate
    from src.train import build_task_loop

    overrides = (*SYNTHETIC, "model=mlp", "trainer.max_steps=1", "dataset.tasks.n_tasks=2")
    built = []
    original = validate.instantiate

    def counting(node, *a, **k):
        if "input_shape" in k:
            built.append(node._target_)
        return original(node, *a, **k)

    monkeypatch.setattr(validate, "instantiate", counting)
    loop = build_loop(tmp_path / "once", *overrides)
    assert len(built) == 1 and validate._kept is None  # handed over, not kept
    rng_after = torch.get_rng_state()

    monkeypatch.setattr(validate, "_kept", None)  # the run builds it itself, as before
    cfg = compose_config("logger=none", "callbacks=none", "method=finetune", *overrides, run_dir=tmp_path / "own")
    (tmp_path / "own").mkdir()
    own = build_task_loop(cfg, tmp_path / "own", validate=False)
    assert torch.equal(torch.get_rng_state(), rng_after)  # what comes after the backbone (the heads) starts alike
    a, b = loop.module.state_dict(), own.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    validate.validate_config(cfg)  # kept for this config ...
    cfg.model.hidden = [7]  # ... which then changed: not taken
    assert validate.take_validated_backbone(cfg, (1, 8, 8)) is None
