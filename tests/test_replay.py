"""ER and DER++ in the real training loop: one forward over current + replayed samples, the buffer holds the raw
training samples it was offered, replayed samples are prepared like a current batch, a run resumed mid-task with a
partly filled buffer equals an uninterrupted one, and under DDP (2 gloo processes) the buffer is the same on both
ranks."""

from __future__ import annotations

import pytest
import torch

from src.continual.validate import ConfigError
from tests.helpers import SYNTHETIC, build_loop, read_results, run_train
from tests.test_ddp import PROTOCOL, assert_same
from tests.test_resume import CrashAtStep, crash_and_resume

SMALL = (*SYNTHETIC, "dataset.tasks.n_tasks=2", "trainer.max_steps=4", "dataset.batch_size=16",
         "save_checkpoints=false")


@pytest.mark.parametrize(("method", "draws"), [("er", 1), ("derpp", 2)])
def test_one_forward_over_current_and_replayed_samples(tmp_path, method, draws):
    loop = build_loop(tmp_path, *SMALL, f"method={method}", "method.buffer_size=40", "method.replay_batch_size=8",
                      "scenario=class")
    sizes = []
    forward = loop.module.forward
    loop.module.forward = lambda x: (sizes.append(len(x)) if torch.is_grad_enabled() else None, forward(x))[1]
    results = loop.run()
    assert results["status"] == "finished"
    assert sizes == [16] + [16 + 8 * draws] * 7  # the very first step has nothing to replay
    buffer = loop.module.regularizer.buffer
    assert buffer.seen == 2 * 4 * 16 and len(buffer) == 40
    # every held sample is a raw uint8 training image with its own task id and local label
    dm, held = loop.dm, buffer.contents()
    assert held["images"].dtype == torch.uint8
    by_image = {}
    for task in dm.task_list:
        for index, label in zip(task.train_index.tolist(), task.train_label.tolist(), strict=True):
            by_image.setdefault(dm.data.train_x[index].numpy().tobytes(), set()).add((dm.task_list.index(task), label))
    for image, label, task in zip(held["images"], held["labels"].tolist(), held["task_ids"].tolist(), strict=True):
        assert (task, label) in by_image[image.numpy().tobytes()]
    assert set(held["task_ids"].tolist()) == {0, 1}
    if method == "derpp":
        assert held["logits"].shape == (40, loop.module.scenario.n_outputs)


@pytest.mark.slow
def test_steps_per_batch_4_equals_1(tmp_path):
    """Manual optimisation (K steps per Lightning batch) replays, stores and augments exactly as one step per batch."""
    augment = ("+dataset.augment._target_=src.data.augment.RandomCropFlip", "+dataset.augment.padding=1")
    states = []
    for k in (1, 4):
        loop = build_loop(tmp_path / f"k{k}", *SMALL, "method=derpp", "method.buffer_size=40",
                          "method.replay_batch_size=8", "scenario=class", "deterministic=true", *augment,
                          f"steps_per_batch={k}")
        loop.run()
        states.append((loop.module.regularizer.state_dict(), loop.module.state_dict()))
    assert_same(states[0][0], states[1][0])
    assert_same(states[0][1], states[1][1], rtol=1e-5, atol=1e-7)


def test_replayed_samples_are_prepared_like_a_current_batch(tmp_path):
    augment = ("+dataset.augment._target_=src.data.augment.RandomCropFlip", "+dataset.augment.padding=2")
    loop = build_loop(tmp_path, *SMALL, "dataset=permuted_mnist", *augment)
    dm = loop.dm
    dm.setup()
    raw = (dm.data.train_x[:6], torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 1, 0, 1, 0]))
    a, b = dm.prepare_replayed(raw, 10), dm.prepare_replayed(raw, 10)
    assert torch.equal(a[0], b[0])  # a function of (seed, task, step): a resumed run replays the same
    assert not torch.equal(a[0], dm.prepare_replayed(raw, 11)[0])
    dm.augment = None  # without augmentation: exactly the normalisation and each sample's own task transform
    plain = dm.prepare_replayed(raw, 10)[0]
    for i in range(len(raw[2])):
        alone = dm.prepare_replayed(tuple(t[i : i + 1] for t in raw), 10)[0]
        assert torch.equal(plain[i : i + 1], alone)
    same_image_other_task = dm.prepare_replayed((raw[0][:1], raw[1][:1], torch.tensor([1])), 10)[0]
    assert not torch.equal(plain[:1], same_image_other_task)  # each task has its own permutation


@pytest.mark.parametrize("method", ["er", pytest.param("derpp", marks=pytest.mark.slow)])
def test_resume_mid_task_with_a_partly_filled_buffer(tmp_path, method):
    # 7 steps of 16 per task: the crash at step 10 (task 1) comes with 160 of 400 slots filled
    overrides = ["trainer.max_steps=7", f"method={method}", "method.buffer_size=400", "method.replay_batch_size=8",
                 "scenario=class", "+dataset.augment._target_=src.data.augment.RandomCropFlip",
                 "+dataset.augment.padding=1"]
    assert crash_and_resume(tmp_path, overrides, CrashAtStep(10)) == "training"
    state = torch.load(tmp_path / "crashed" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    reference = torch.load(tmp_path / "ref" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert_same(state["regularizer"], reference["regularizer"])


def test_train_classes_current_is_refused(tmp_path):
    loop = build_loop(tmp_path, *SMALL, "method=er", "scenario=class", "scenario.train_classes=current")
    with pytest.raises(ConfigError, match="scenario.train_classes='current' is invalid with replay"):
        loop.run()
    assert loop.module.trainer.global_step == 0  # refused before the first step


DDP_ER = (*PROTOCOL, "method=er", "method.buffer_size=50", "method.replay_batch_size=8")


@pytest.fixture(scope="module")
def ddp_er_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_er")
    run_train(folder / "run", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *DDP_ER,
              "+callbacks.rank_state._target_=tests.test_ddp.RankState", f"+callbacks.rank_state.folder={folder}/ranks")
    return folder


@pytest.mark.slow
def test_ddp_buffer_is_identical_on_every_rank(ddp_er_run):
    results = read_results(ddp_er_run / "run")
    assert results["status"] == "finished" and results["method"] == "er"
    dumps = sorted((ddp_er_run / "ranks").glob("rank0_*.pt"))
    assert len(dumps) == 7
    for rank0 in dumps:
        a = torch.load(rank0, weights_only=False)
        b = torch.load(rank0.with_name(rank0.name.replace("rank0", "rank1")), weights_only=False)
        assert_same(a["regularizer"], b["regularizer"])
        assert_same(a["weights"], b["weights"])
    buffer = torch.load(dumps[-1], weights_only=False)["regularizer"]["buffer"]
    # every sample of the global batches was offered once: 3 tasks × 2 steps of 128 (the DDP batch rule)
    assert buffer["seen"] == 3 * 2 * 128
    assert set(buffer["task_ids"].tolist()) == {0, 1, 2}


@pytest.mark.slow
def test_ddp_buffer_and_accuracies_equal_one_process(ddp_er_run, tmp_path):
    run_train(tmp_path / "one", *DDP_ER, "deterministic=true")
    one, two = read_results(tmp_path / "one"), read_results(ddp_er_run / "run")
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=False)["regularizer"]["buffer"]
    b = torch.load(ddp_er_run / "run" / "checkpoints" / "last.ckpt", weights_only=False)["regularizer"]["buffer"]
    for key in ("images", "labels", "task_ids", "seen"):
        assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key
    for row_one, row_two in zip(one["acc_matrix"], two["acc_matrix"], strict=True):
        assert row_one == pytest.approx(row_two, abs=1e-6)


@pytest.mark.parametrize("preset", ["vdv2022_split_cifar100_er", "vdv2022_split_cifar100_si"])
def test_vdv2022_presets_compose_for_every_scenario(tmp_path, preset):
    from hydra.utils import instantiate

    from tests.helpers import ROOT, compose_config

    assert "van de Ven" in (ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text()
    for scenario in ("task", "domain", "class"):
        cfg = compose_config(f"experiment={preset}", f"scenario={scenario}", run_dir=tmp_path)
        method = instantiate(cfg.method)
        assert (cfg.trainer.max_steps, cfg.dataset.batch_size, cfg.optimizer.lr) == (5000, 256, 1e-4)
        if preset.endswith("_er"):  # 100 samples per class of the 100 classes; replayed batch = current batch
            assert method.buffer.capacity // 100 == 100 and method.buffer.sampling == "class_balanced"
            assert method.replay_batch_size == 256
