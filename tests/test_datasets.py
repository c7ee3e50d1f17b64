"""The benchmark datasets: configs, task constructions (class splits, permutations, rotations), label mapping per
scenario, and short end-to-end runs through `python -m src.train` as a user types them."""

import json
import math
import os

import pytest
import torch
from hydra.utils import instantiate

from src.continual.scenarios import ClassIncremental, DomainIncremental, TaskIncremental
from src.data.datamodule import TaskSequenceDataModule
from src.data.tasks import ClassSplit, Permutations, Rotations
from tests.fake_datasets import FileServer, cifar100_archive, md5, write
from tests.helpers import FMNIST_SYSTEM_DIR, ROOT, SyntheticSource, compose_config, read_results, run_train

CIFAR100_NAME = "cifar-100-python.tar.gz"
LOOPBACK_ENV = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A data folder holding the generated CIFAR-100 archive (as if downloaded earlier)."""
    root = tmp_path_factory.mktemp("data")
    hundred = cifar100_archive()
    write(root, {CIFAR100_NAME: hundred})
    return root, md5(hundred)


def datamodule(*overrides, run_dir):
    cfg = compose_config(*overrides, run_dir=run_dir)
    dm = instantiate(cfg.dataset, _recursive_=True)
    dm.setup()
    return dm, cfg


# ---- configs ------------------------------------------------------------------------------------------------------
def test_split_cifar_is_an_alias_of_split_cifar100(tmp_path):
    alias = compose_config("dataset=split_cifar", run_dir=tmp_path).dataset
    hundred = compose_config("dataset=split_cifar100", run_dir=tmp_path).dataset
    assert alias == hundred and alias.source._target_ == "src.data.cifar.CIFAR100"
    assert (alias.tasks.n_tasks, alias.tasks.classes_per_task) == (10, 10)
    ten = compose_config("dataset=split_cifar10", run_dir=tmp_path).dataset
    assert ten.source._target_ == "src.data.cifar.CIFAR10" and (ten.tasks.n_tasks, ten.tasks.classes_per_task) == (5, 2)
    assert ten.source.md5 == "c58f30108f718f92721af3b95e74349a" and alias.source.md5 == "eb9058c3a382ffc7106e4002c42a8d85"


@pytest.mark.parametrize("name", ["split_mnist", "permuted_mnist", "rotated_mnist", "permuted_fmnist", "rotated_fmnist"])
def test_mnist_family_configs_build(tmp_path, name):
    cfg = compose_config(f"dataset={name}", run_dir=tmp_path)
    tasks = instantiate(cfg.dataset.tasks)
    source = instantiate(cfg.dataset.source)
    assert source.n_classes == 10 and source.input_shape == (1, 28, 28)
    assert tasks.n_tasks == (5 if name == "split_mnist" else 10)
    if name != "split_mnist":  # domain-incremental by construction; the file says so
        assert "scenario=domain" in (ROOT / "conf" / "dataset" / f"{name}.yaml").read_text()


def test_split_cifar100_tasks_and_label_mapping_per_scenario(tmp_path, cifar_root):
    root, md5_100 = cifar_root
    dm, _ = datamodule("dataset=split_cifar", f"paths.data_dir={root}", f"dataset.source.md5={md5_100}",
                       "dataset.source.url=null", "dataset.val_fraction=0", run_dir=tmp_path)
    assert dm.n_tasks == 10 and dm.classes_per_task == 10 and dm.input_shape == (3, 32, 32)
    assert dm.task_classes() == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    for t, task in enumerate(dm.task_list):
        assert torch.equal(dm.data.train_y[task.train_index], task.train_label + 10 * t)
        assert len(task.test_index) == 20
    x, y, task_ids = next(iter(dm._loader("train", [3, 7], 64, shuffle=True)))
    logits = torch.randn(len(y), 100)
    _, targets = ClassIncremental(10, 10).train_view(logits, y, task_ids, current_task=7)
    assert torch.equal(targets, task_ids * 10 + y)  # global label = task * 10 + local
    own, local = TaskIncremental(10, 10).train_view(logits, y, task_ids, current_task=7)
    assert own.shape == (len(y), 10) and torch.equal(local, y)
    assert DomainIncremental(10, 10).n_outputs == 10


# ---- permutations -------------------------------------------------------------------------------------------------
def build(tasks, n_classes=10, n=200, val_fraction=0.1, seed=0):
    train_y = torch.arange(n_classes).repeat(n // n_classes)
    test_y = torch.arange(n_classes).repeat(5)
    return tasks.build(train_y, test_y, n_classes, val_fraction, seed), train_y, test_y


def test_domain_tasks_hold_every_image_with_its_own_label():
    task_list, train_y, test_y = build(Permutations(n_tasks=4, seed=1))
    assert len(task_list) == 4
    for task in task_list:
        assert task.classes == list(range(10))
        assert torch.equal(task.train_label, train_y[task.train_index])
        assert torch.equal(task.test_index, torch.arange(len(test_y))) and torch.equal(task.test_label, test_y)
        assert torch.equal(task.val_index, task_list[0].val_index) and len(task.val_index) == 20
        assert len(task.train_index) + len(task.val_index) == len(train_y)


def test_permutations_are_fixed_by_the_seed():
    def perms(seed, identity=False, n_tasks=5):
        p = Permutations(n_tasks=n_tasks, seed=seed, first_task_identity=identity)
        build(p)
        return p.permutations(784)

    a, b = perms(3), perms(3)
    assert torch.equal(a, b) and a.shape == (5, 784) and a.dtype == torch.int64
    assert not torch.equal(a, perms(4))
    assert torch.equal(perms(3, n_tasks=8)[:5], a)  # task t's permutation does not depend on the number of tasks
    for row in a:
        assert torch.equal(row.sort().values, torch.arange(784))
    with_identity = perms(3, identity=True)
    assert torch.equal(with_identity[0], torch.arange(784)) and torch.equal(with_identity[1], a[0])
    run_seed = Permutations(n_tasks=2, seed=None)
    build(run_seed, seed=3)  # seed null: the run's seed
    assert run_seed.used_seed == 3 and torch.equal(run_seed.permutations(784), a[:2])


def test_permutation_transform_is_per_sample_and_invertible():
    p = Permutations(n_tasks=3, seed=0)
    build(p)
    x = torch.randn(6, 2, 4, 5)
    task_ids = torch.tensor([0, 1, 2, 2, 1, 0])
    out = p.batch_transform(x, task_ids)
    table = p.permutations(20)
    for i, t in enumerate(task_ids.tolist()):
        for c in range(2):
            assert torch.equal(out[i, c].flatten(), x[i, c].flatten()[table[t]])
        inverse = torch.argsort(table[t])
        assert torch.equal(out[i].flatten(1)[:, inverse], x[i].flatten(1))


# ---- rotations ----------------------------------------------------------------------------------------------------
def test_rotation_angles_evenly_spaced_listed_or_drawn_from_the_seed():
    even = Rotations(n_tasks=10, max_angle=180)
    build(even)
    assert even.angles() == pytest.approx([20.0 * t for t in range(10)])
    assert Rotations(n_tasks=3, angles=[0, 45, 90]).angles() == [0.0, 45.0, 90.0]

    def drawn(seed):
        r = Rotations(n_tasks=20, random=True, seed=seed)
        build(r)
        return r.angles()

    assert drawn(5) == drawn(5) != drawn(6) and all(0 <= a < 180 for a in drawn(5))


def test_rotation_matches_rot90_keeps_0_degrees_exact_and_mixes_tasks_in_a_batch():
    r = Rotations(n_tasks=4, angles=[0, 90, 180, 270])
    build(r)
    x = torch.randn(8, 3, 6, 6)
    task_ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = r.batch_transform(x, task_ids)
    for i, t in enumerate(task_ids.tolist()):
        expected = torch.rot90(x[i], k=t, dims=(1, 2))  # counter-clockwise as displayed
        assert torch.allclose(out[i], expected, atol=1e-5), (i, t)
    assert torch.equal(out[task_ids == 0], x[task_ids == 0])


def test_rotation_fills_the_corners_with_the_background():
    r = Rotations(n_tasks=2, angles=[0, 45])
    build(r)
    x = torch.full((1, 1, 28, 28), -0.42)  # the normalised value of black
    x[0, 0, 10:18, 10:18] = 2.0
    out = r.batch_transform(x, torch.tensor([1]))
    assert out[0, 0, 0, 0] == pytest.approx(-0.42) and out[0, 0, 27, 27] == pytest.approx(-0.42)
    assert out[0, 0, 14, 14] == pytest.approx(2.0)


def test_describe_is_json_ready_for_results():
    split = ClassSplit(n_tasks=5, classes_per_task=2, shuffle_seed=1)
    build(split)
    p, r = Permutations(n_tasks=3, seed=2, first_task_identity=True), Rotations(n_tasks=3)
    build(p)
    build(r)
    described = [split.describe(), p.describe((1, 28, 28)), r.describe((1, 28, 28))]
    json.dumps(described)
    assert described[0]["class_order"] == split.order(10) and sorted(described[0]["class_order"]) == list(range(10))
    assert described[1]["permutations"] == p.permutations(784).tolist() and described[1]["seed"] == 2
    assert described[1]["permutations"][0] == list(range(784))
    assert described[2]["angles"] == [0.0, 90.0, 180.0]


@pytest.mark.parametrize("tasks", [Permutations(n_tasks=3, seed=0), Rotations(n_tasks=3, angles=[0, 30, 60])])
def test_domain_tasks_through_the_datamodule_map_labels_per_scenario(tasks):
    dm = TaskSequenceDataModule(SyntheticSource(shape=(1, 8, 8)), tasks, batch_size=30, eval_batch_size=50,
                                val_fraction=0.0)
    dm.setup()
    assert dm.classes_per_task == 10 and dm.task_classes() == [list(range(10))] * 3
    dm.set_task(2, include_past=True)  # a joint batch mixes tasks
    x, y, task_ids = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.dtype == torch.float32 and x.shape == (30, 1, 8, 8) and set(task_ids.tolist()) <= {0, 1, 2}
    logits = torch.randn(30, 30)
    assert torch.equal(ClassIncremental(3, 10).train_view(logits, y, task_ids, 2)[1], task_ids * 10 + y)
    assert torch.equal(TaskIncremental(3, 10).train_view(logits, y, task_ids, 2)[1], y)
    assert torch.equal(DomainIncremental(3, 10).train_view(logits[:, :10], y, task_ids, 2)[1], y)
    first = [b for b in dm.eval_dataloaders()]
    assert [len(loader.index) for loader in first] == [200] * 3  # every task evaluates on every test image


# ---- end to end, as a user runs it ------------------------------------------------------------------------------
FAST = ("logger=none", "save_checkpoints=false", "dataset.val_fraction=0", "trainer.max_steps=3")


@pytest.mark.parametrize("method", ["finetune", "lwf"])
def test_split_cifar_end_to_end_downloads_from_the_loopback_host(tmp_path, method):
    if method == "lwf" and not (ROOT / "conf" / "method" / "lwf.yaml").is_file():
        pytest.skip("conf/method/lwf.yaml does not exist yet (LwF is being written in parallel)")
    archive = cifar100_archive()
    server = FileServer({CIFAR100_NAME: archive})
    try:
        run_dir = tmp_path / "run"
        proc = run_train(run_dir, f"method={method}", "dataset=split_cifar", *FAST, "dataset.tasks.n_tasks=3",
                         f"paths.data_dir={tmp_path / 'data'}", f"dataset.source.url={server.url}",
                         f"dataset.source.md5={md5(archive)}", env=LOOPBACK_ENV)
        assert server.requests == [f"/files/{CIFAR100_NAME}"]
    finally:
        server.close()
    results = read_results(run_dir)
    assert results["status"] == "finished" and results["method"] == method
    assert results["task_classes"] == [list(range(10 * t, 10 * t + 10)) for t in range(3)]
    assert len(results["acc_matrix"]) == 3 and results["steps_per_task"] == [3, 3, 3]
    assert (tmp_path / "data" / "cifar-100-python" / "train").is_file()
    assert "Traceback" not in proc.stderr


@needs_fmnist
@pytest.mark.parametrize("dataset", ["permuted_fmnist", "rotated_fmnist"])
def test_domain_benchmarks_on_the_real_fashion_mnist(tmp_path, dataset):
    run_dir = tmp_path / "run"
    run_train(run_dir, f"dataset={dataset}", "scenario=domain", *FAST, "dataset.tasks.n_tasks=2",
              "dataset.eval_batch_size=5000", f"paths.data_dir={tmp_path / 'data'}")
    results = read_results(run_dir)
    assert results["status"] == "finished" and results["scenario"] == "domain"
    assert results["task_classes"] == [list(range(10))] * 2
    R = results["acc_matrix"]
    assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert R[0][0] > 0.2  # three steps of Adam already beat chance on the first task
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.gz"))  # Debian's copy was used


def test_missing_cifar_through_the_cli_is_one_clear_line(tmp_path):
    proc = run_train(tmp_path / "run", "dataset=split_cifar10", *FAST, f"paths.data_dir={tmp_path}",
                     "dataset.source.url=http://127.0.0.1:9", check=False, env=LOOPBACK_ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cifar-10-batches-py/ not found in") and "cifar-10-python.tar.gz" in last


def test_permuted_input_keeps_pixel_statistics():
    p = Permutations(n_tasks=2, seed=0)
    build(p)
    x = torch.randn(4, 1, 28, 28)
    out = p.batch_transform(x, torch.tensor([1, 1, 0, 1]))
    assert torch.allclose(out.sum(dim=(2, 3)), x.sum(dim=(2, 3)), atol=1e-4)
    assert math.isclose(float(out.std()), float(x.std()), rel_tol=1e-5)



# ---- published-protocol presets -----------------------------------------------------------------------------------
PRESETS = ["vdv2022_split_mnist", "vdv2022_split_mnist_ewc", "vdv2022_split_mnist_lwf", "vdv2022_split_cifar100",
           "vdv2022_split_cifar100_ewc", "vdv2022_split_cifar100_lwf", "kirkpatrick2017_permuted_mnist",
           "kirkpatrick2017_permuted_mnist_ewc"]
EWC_LAMBDA = {"vdv2022_split_mnist_ewc": {"task": 1e5, "domain": 1e10, "class": 1e9},
              "vdv2022_split_cifar100_ewc": {"task": 1e3, "domain": 1e3, "class": 1e2}}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_for_every_scenario_and_cite_their_source(tmp_path, preset):
    header = (ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text()
    assert ("van de Ven" in header or "Kirkpatrick" in header) and "@package _global_" in header
    for scenario in ("task", "domain", "class"):
        cfg = compose_config(f"experiment={preset}", f"scenario={scenario}", run_dir=tmp_path)
        assert cfg.scenario._target_.endswith({"task": "TaskIncremental", "domain": "DomainIncremental",
                                               "class": "ClassIncremental"}[scenario])
        instantiate(cfg.method)  # methods check their own keys
        if preset in EWC_LAMBDA:
            assert cfg.method["lambda"] == EWC_LAMBDA[preset][scenario]
    if preset.startswith("vdv2022_split_mnist"):
        assert (cfg.trainer.max_steps, cfg.dataset.batch_size, cfg.optimizer.lr, list(cfg.model.hidden)) == \
            (2000, 128, 1e-3, [400, 400]) and cfg.dataset.val_fraction == 0
    if preset.startswith("vdv2022_split_cifar100"):
        assert (cfg.trainer.max_steps, cfg.dataset.batch_size, cfg.optimizer.lr) == (5000, 256, 1e-4)
        assert cfg.model.freeze_trunk and cfg.model.pretrained.endswith("convnet_fc-split_cifar10.pt")
        assert list(cfg.model.fc) == [2000, 2000] and list(cfg.model.channels) == [16, 32, 64, 128, 256]
    if preset.endswith("_lwf"):
        assert cfg.method.temperature == 2.0
    if preset.startswith("kirkpatrick"):
        default = compose_config(f"experiment={preset}", run_dir=tmp_path)
        assert default.scenario._target_.endswith("DomainIncremental")


def test_split_mnist_preset_runs_with_ewc_on_official_format_files(tmp_path):
    from tests.fake_datasets import mnist_files
    from tests.helpers import build_loop

    files = mnist_files()
    folder = write(tmp_path / "data" / "mnist", files)
    checksums = ",".join(f"{name}:{md5(data)}" for name, data in files.items())
    loop = build_loop(tmp_path, "experiment=vdv2022_split_mnist_ewc", "method=ewc", "scenario=class", "trainer.max_steps=2",
                      f"paths.data_dir={folder.parent}", "dataset.source.url=null", f"+dataset.source.md5={{{checksums}}}",
                      "save_checkpoints=false")
    assert loop.module.regularizer.lam == 1e9 and loop.dm.n_tasks == 5
    results = loop.run()
    assert results["status"] == "finished" and results["steps_per_task"] == [2] * 5
    assert sorted(sum(results["task_classes"], [])) == list(range(10))  # digits shuffled into pairs by the seed
    assert results["task_classes"] != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
