"""Task splits, label mapping per scenario, and the batch loaders."""

import pytest
import torch

from src.continual.scenarios import ClassIncremental, DomainIncremental, TaskIncremental
from src.data.datamodule import TaskSequenceDataModule
from src.data.download import DatasetError
from src.data.fashion_mnist import FashionMNIST
from src.data.loader import TensorBatchLoader
from src.data.tasks import ClassSplit
from tests.helpers import FMNIST_SYSTEM_DIR, SyntheticSource


def make_dm(source=None, **task_kwargs):
    task_kwargs = {"n_tasks": 5, "classes_per_task": 2, **task_kwargs}
    dm = TaskSequenceDataModule(source or SyntheticSource(), ClassSplit(**task_kwargs), batch_size=16,
                                eval_batch_size=50, val_fraction=0.1, seed=0)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def fmnist_dm(tmp_path_factory):
    if not FMNIST_SYSTEM_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (setup.sh installs it)")
    return make_dm(FashionMNIST(root=str(tmp_path_factory.mktemp("data")), system_dir=str(FMNIST_SYSTEM_DIR), url=None))


def test_fashion_mnist_tasks_hold_exactly_their_classes(fmnist_dm):
    data = fmnist_dm.data
    assert data.train_x.shape == (60000, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert fmnist_dm.task_classes() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for t, task in enumerate(fmnist_dm.task_list):
        assert set(data.train_y[task.train_index].tolist()) == {2 * t, 2 * t + 1}
        assert set(data.train_y[task.val_index].tolist()) == {2 * t, 2 * t + 1}
        assert set(data.test_y[task.test_index].tolist()) == {2 * t, 2 * t + 1}
        assert len(task.test_index) == 2000  # 1,000 test images per class
        assert len(task.train_index) + len(task.val_index) == 12000
        assert len(task.val_index) == 1200  # 10% of every class
        # local label = position of the class in the task
        assert torch.equal(task.train_label, data.train_y[task.train_index] - 2 * t)


def test_tasks_are_disjoint_and_splits_never_overlap(fmnist_dm):
    train = torch.cat([t.train_index for t in fmnist_dm.task_list])
    val = torch.cat([t.val_index for t in fmnist_dm.task_list])
    test = torch.cat([t.test_index for t in fmnist_dm.task_list])
    assert len(set(train.tolist())) == len(train) == 54000
    assert len(set(val.tolist())) == len(val) == 6000
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(set(test.tolist())) == 10000


def test_explicit_and_shuffled_class_orders():
    explicit = make_dm(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert explicit.task_classes() == [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]
    first = explicit.task_list[0]
    assert torch.equal(first.train_label, (explicit.data.train_y[first.train_index] == 8).long())

    a, b, c = make_dm(shuffle_seed=3), make_dm(shuffle_seed=3), make_dm(shuffle_seed=4)
    assert a.task_classes() == b.task_classes()
    assert a.task_classes() != c.task_classes()
    assert sorted(sum(a.task_classes(), [])) == list(range(10))


def test_bad_splits_fail_with_the_key_named():
    with pytest.raises(DatasetError, match="n_tasks × classes_per_task"):
        make_dm(n_tasks=6)
    with pytest.raises(DatasetError, match="class_order"):
        make_dm(class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])


def test_label_mapping_per_scenario():
    labels, tasks = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 2, 4, 3])
    logits = torch.arange(4 * 10, dtype=torch.float).view(4, 10)

    task_il = TaskIncremental(5, 2)
    view, target = task_il.train_view(logits, labels, tasks, current_task=4)
    assert torch.equal(target, labels)  # local labels
    assert torch.equal(view, torch.stack([logits[0, 0:2], logits[1, 4:6], logits[2, 8:10], logits[3, 6:8]]))

    class_il = ClassIncremental(5, 2)
    view, target = class_il.train_view(logits, labels, tasks, current_task=4)
    assert torch.equal(target, torch.tensor([0, 5, 9, 6]))  # global labels
    view, _ = class_il.eval_view(logits, labels, tasks, trained_up_to=1)
    assert view.shape == (4, 4)  # argmax over the classes seen so far only
    view, target = ClassIncremental(5, 2, train_classes="current").train_view(
        logits[:1], labels[:1] + 1, torch.tensor([2]), current_task=2)
    assert torch.equal(view, logits[:1, 4:6]) and target.tolist() == [1]

    domain = DomainIncremental(5, 2)
    assert domain.n_outputs == 2
    view, target = domain.eval_view(logits[:, :2], labels, tasks, trained_up_to=4)
    assert torch.equal(target, labels)


def test_train_loader_serves_only_the_current_task_and_joint_the_union():
    dm = make_dm()
    dm.set_task(2)
    seen = set()
    for x, _, t in dm.train_dataloader():
        seen.update(t.tolist())
        assert x.dtype == torch.uint8
    assert seen == {2}
    dm.set_task(2, include_past=True)
    batches = list(dm.train_dataloader())
    assert {int(v) for _, _, t in batches for v in t} == {0, 1, 2}
    assert sum(len(y) for _, y, _ in batches) == sum(len(dm.task_list[k].train_index) for k in range(3))


def test_eval_loaders_cover_every_test_sample_once():
    dm = make_dm()
    loaders = dm.eval_dataloaders("test")
    assert len(loaders) == 5
    for t, loader in enumerate(loaders):
        n = sum(len(y) for _, y, _ in loader)
        assert n == len(dm.task_list[t].test_index)


def test_shards_for_ddp():
    images = torch.arange(103, dtype=torch.uint8).view(103, 1, 1, 1)
    index, labels, tasks = torch.arange(103), torch.zeros(103, dtype=torch.long), torch.zeros(103, dtype=torch.long)

    def seen(rank, shuffle):
        loader = TensorBatchLoader(images, index, labels, tasks, 10, shuffle, seed=1, rank=rank, world_size=2)
        return [int(v) for x, _, _ in loader for v in x.flatten()], len(loader)

    (r0, n0), (r1, n1) = seen(0, False), seen(1, False)
    assert n0 == 6 and n1 == 6  # 52 and 51 samples in batches of 10
    assert sorted(r0 + r1) == list(range(103)) and not set(r0) & set(r1)  # evaluation: every sample exactly once
    (t0, m0), (t1, m1) = seen(0, True), seen(1, True)
    # training (the DDP batch rule, tests/test_ddp.py): the ranks take parts of every single-process batch, so a
    # pass is every sample exactly once, in the same number of steps on both ranks (the last batch of 3: parts 1, 2)
    assert sorted(t0 + t1) == list(range(103)) and not set(t0) & set(t1) and m0 == m1 == 11
    assert sorted((len(t0), len(t1))) == [51, 52]


def test_epochs_are_shuffled_differently_but_reproducibly():
    def orders():
        dm = make_dm()
        dm.set_task(0)
        loader = dm.train_dataloader()
        return [torch.cat([y for _, y, _ in loader]).tolist() for _ in range(2)]

    first, again = orders(), orders()
    assert first == again
    assert first[0] != first[1]


def test_normalisation_on_the_device():
    dm = make_dm()
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    out, _, _ = dm.on_after_batch_transfer((x, torch.zeros(2), torch.zeros(2)), 0)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([(0 - 0.2) / 0.3, (1 - 0.2) / 0.3])
