"""Checkpoints kept on disk: by default only `checkpoints/last.ckpt` (what resume needs);
`checkpoint.keep_every_task=true` keeps every task's file as well, last.ckpt linking the newest."""

from __future__ import annotations

import os

import pytest
import torch

from src.continual.validate import ConfigError, validate_config
from tests.helpers import SYNTHETIC, build_loop, compose_config

TINY = (*SYNTHETIC, "+dataset.source.n_test=5", "trainer.max_steps=1", "dataset.tasks.n_tasks=3",
        "+dataset.source.n_classes=6", "checkpoint.every_n_steps=1")


def test_a_default_run_keeps_one_checkpoint_file(tmp_path):
    loop = build_loop(tmp_path, *TINY)
    loop.run()
    files = list((loop.run_dir / "checkpoints").iterdir())
    assert [p.name for p in files] == ["last.ckpt"]
    state = torch.load(files[0], weights_only=False)["continual"]
    assert (state["phase"], state["task"]) == ("done", 2)  # the end of the last task: a finished run


def test_keep_every_task_keeps_one_file_per_task(tmp_path):
    loop = build_loop(tmp_path, *TINY, "checkpoint.keep_every_task=true")
    loop.run()
    folder = loop.run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "task_0.ckpt", "task_1.ckpt", "task_2.ckpt"]
    for task in range(3):
        assert torch.load(folder / f"task_{task}.ckpt", weights_only=False)["continual"]["task"] == task
    assert os.stat(folder / "last.ckpt").st_ino == os.stat(folder / "task_2.ckpt").st_ino


@pytest.mark.parametrize(("value", "shown"), [("1", "1"), ("maybe", "'maybe'")])
def test_keep_every_task_must_be_a_boolean(tmp_path, value, shown):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(f"checkpoint.keep_every_task={value}", run_dir=tmp_path))
    assert str(err.value) == f"checkpoint.keep_every_task={shown} is invalid: true or false"
