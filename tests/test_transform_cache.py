"""Permuted and rotated tasks: the training task's images transformed once when it starts (the DataModule's cache)
give exactly the batches, and so exactly the run, of transforming every batch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SYNTHETIC, build_loop

DATASETS = ["dataset=rotated_mnist", "dataset=permuted_mnist"]
SMALL = (*SYNTHETIC, "dataset.tasks.n_tasks=3", "dataset.batch_size=32", "dataset.eval_batch_size=100",
         "scenario=domain")


@pytest.mark.parametrize("dataset", DATASETS)
def test_cached_batches_are_bit_identical_to_per_batch_ones(tmp_path, dataset):
    dm = build_loop(tmp_path, dataset, *SMALL).dm
    for task in (0, 2, 1):  # the cache follows the task
        dm.set_task(task)
        loader = dm.train_dataloader()
        assert loader.record_rows
        n = 0
        for batch in loader:
            rows = loader.rows.popleft()
            cached = dm._prepare(batch, 0, rows=rows)
            per_batch = dm._prepare(batch, 0)
            assert torch.equal(cached[0], per_batch[0]) and torch.equal(cached[1], per_batch[1])
            assert torch.equal(cached.raw[0], batch[0])  # what a replay buffer stores stays the raw uint8 batch
            n += 1
        assert n == loader.steps_per_pass() and not loader.rows
        assert dm._transform_cache[0][0] == task


def test_no_cache_when_batches_mix_tasks_or_are_augmented_or_split(tmp_path):
    dm = build_loop(tmp_path, "dataset=rotated_mnist", *SMALL).dm
    dm.set_task(1, include_past=True)  # joint: a batch holds several tasks
    assert not dm.train_dataloader().record_rows
    split = build_loop(tmp_path / "split", *SYNTHETIC).dm
    assert not split.train_dataloader().record_rows  # class splits have no input transform


def test_no_cache_for_a_task_shorter_than_its_images(tmp_path):
    """7 steps of 32 images transform 224 images per batch; the cache would transform all 900 of the task."""
    loop = build_loop(tmp_path, "dataset=rotated_mnist", *SMALL, "trainer.max_steps=7", "save_checkpoints=false")
    loop.run()
    assert loop.dm._transform_cache is None


@pytest.mark.parametrize("overrides", [
    ("dataset=rotated_mnist", "method=er", "method.buffer_size=50"),  # replay: earlier tasks' samples per batch
    ("dataset=permuted_mnist", "steps_per_batch=3", "method=ewc"),
])
def test_a_run_is_the_same_with_and_without_the_cache(tmp_path, overrides):
    results = {}
    for cache in (True, False):
        # 30 steps of 32 ≥ the task's 900 training images: long enough to cache
        loop = build_loop(tmp_path / str(cache), *overrides, *SMALL, "trainer.max_steps=30", "deterministic=true",
                          f"dataset.cache_task_transform={cache}", "save_checkpoints=false")
        out = loop.run()
        results[cache] = (out["acc_matrix"], {k: v.clone() for k, v in loop.module.state_dict().items()})
        assert (loop.dm._transform_cache is not None) == cache
    assert results[True][0] == results[False][0]
    for name, value in results[True][1].items():
        assert torch.equal(value, results[False][1][name]), name
