"""Training augmentation: batched random crop (4-pixel padding) + horizontal flip, reproducible, training only."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.data.augment import RandomCropFlip
from src.data.datamodule import TaskSequenceDataModule
from src.data.tasks import ClassSplit
from tests.helpers import SyntheticSource, compose_config


def images(n=16, c=3, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_shape_dtype_and_device_are_kept():
    x = images()
    out = RandomCropFlip(seed=0)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device


def test_each_output_is_a_window_of_the_padded_image_possibly_mirrored():
    x = images(n=32)
    out = RandomCropFlip(padding=4, seed=1)(x)
    padded = F.pad(x, (4, 4, 4, 4))
    flipped_count = 0
    for i in range(len(x)):
        windows = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda v: v.flip(2) if flip else v)(padded[i, :, dy:dy + 32, dx:dx + 32]))}
        assert windows, f"sample {i} is no crop of its padded image"
        flipped_count += any(flip for *_, flip in windows)
    assert 0 < flipped_count < len(x)  # some samples flipped, some not


def test_no_padding_and_no_flip_is_the_identity():
    x = images()
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x), x)
    only_flip = RandomCropFlip(padding=0, flip=True, seed=0)(x)
    assert all(torch.equal(only_flip[i], x[i]) or torch.equal(only_flip[i], x[i].flip(2)) for i in range(len(x)))


def test_deterministic_under_a_seed():
    x = images()
    a, b = RandomCropFlip(seed=7), RandomCropFlip(seed=7)
    first, second = a(x), a(x)
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))  # the same sequence of draws
    assert not torch.equal(first, second)  # and fresh draws for every batch
    assert not torch.equal(first, RandomCropFlip(seed=8)(x))
    c = RandomCropFlip(seed=7)
    state = c.state_dict()
    c(x)
    c.load_state_dict(state)
    assert torch.equal(c(x), first)


def test_invalid_padding_is_refused():
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)


def make_dm(augment):
    dm = TaskSequenceDataModule(SyntheticSource(shape=(3, 12, 12)), ClassSplit(5, 2), batch_size=20,
                                eval_batch_size=20, val_fraction=0.0, augment=augment)
    dm.setup()
    return dm


def test_applied_to_training_batches_only():
    dm = make_dm(RandomCropFlip(padding=2, seed=0))
    batch = next(iter(dm.train_dataloader()))
    plain = make_dm(None).on_after_batch_transfer(batch, 0)[0]
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)  # no trainer: off
    dm.trainer = SimpleNamespace(training=False, global_rank=0, world_size=1)  # evaluation, a Fisher pass after fit, ...
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)
    assert all(torch.equal(b[0], p[0]) for b, p in zip(dm.task_batches(0), make_dm(None).task_batches(0), strict=True))
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1, global_step=0)
    augmented = dm.on_after_batch_transfer(batch, 0)[0]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


def test_cifar_configs_augment_and_mnist_configs_do_not(tmp_path):
    for name, expected in (("split_cifar100", True), ("split_cifar10", True), ("split_mnist", False)):
        cfg = compose_config(f"dataset={name}", run_dir=tmp_path).dataset
        assert (cfg.augment is not None) == expected, name
        if expected:
            assert cfg.augment.padding == 4 and cfg.augment.flip is True
    off = compose_config("dataset=split_cifar", "dataset.augment=null", run_dir=tmp_path).dataset
    assert off.augment is None


class CountingAugment(RandomCropFlip):
    """Counts the batches it augments (usable from Hydra as `dataset.augment._target_=tests.test_augment.…`)."""

    calls = 0

    def __call__(self, x):
        CountingAugment.calls += 1
        return super().__call__(x)


def test_in_a_real_run_only_training_steps_are_augmented(tmp_path):
    from tests.helpers import SYNTHETIC, build_loop

    CountingAugment.calls = 0
    loop = build_loop(tmp_path, *SYNTHETIC, "+dataset.source.shape=[3,12,12]", "dataset.val_fraction=0",
                      "+dataset.augment._target_=tests.test_augment.CountingAugment", "+dataset.augment.padding=2",
                      "trainer.max_steps=2", "save_checkpoints=false")
    results = loop.run()
    assert results["steps_per_task"] == [2] * 5
    assert CountingAugment.calls == 10  # 2 steps × 5 tasks; the 6 evaluations of 5 tasks never augment
