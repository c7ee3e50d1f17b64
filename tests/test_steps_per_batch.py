"""steps_per_batch = K > 1 (K optimizer steps per Lightning batch, manual optimisation) trains exactly as K = 1:
the same batches in the same order, the same augmentation draws, the same weights, accuracies and logged values
(deterministic=true on CPU)."""

import csv

import pytest
import torch

from src.data.loader import TensorBatchLoader
from tests.helpers import ROOT, SYNTHETIC, build_loop, read_results, run_train

METHODS = [m for m in ("finetune", "ewc", "lwf") if (ROOT / "conf" / "method" / f"{m}.yaml").exists()]
# dropout makes the RNG state matter; 180 training samples per task in batches of 16 = 12 steps per pass (the last
# one of 4 samples), so K = 8 makes superbatches of 8 and 4 steps, and 19 steps per task end in the middle of a pass
COMMON = (*SYNTHETIC, "+dataset.source.n_test=20", "dataset.batch_size=16", "deterministic=true", "model.dropout=0.3")
AUGMENT = ("+dataset.source.shape=[3,12,12]", "+dataset.augment._target_=src.data.augment.RandomCropFlip",
           "+dataset.augment.padding=2")


def train(tmp_path, k, *overrides):
    loop = build_loop(tmp_path / f"k{k}", *COMMON, *overrides, f"steps_per_batch={k}")
    results = loop.run()
    return results, {name: value.clone() for name, value in loop.module.state_dict().items()}, loop


def _untimed(tree):
    if isinstance(tree, dict):
        return {k: _untimed(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [_untimed(v) for v in tree]
    return tree


def assert_same(a, b):
    (results_a, weights_a, _), (results_b, weights_b, _) = a, b
    for key in ("acc_matrix", "random_init_acc", "val_acc_matrix", "steps_per_task"):
        assert results_a[key] == results_b[key], key
    assert _untimed(results_a["method_summary"]) == _untimed(results_b["method_summary"])
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", ["trainer.max_steps=19", "trainer.max_epochs=2"])
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_k8_equals_k1(tmp_path, method, length, augment):
    overrides = (f"method={method}", length, *(AUGMENT if augment else ()))
    reference = train(tmp_path, 1, *overrides)
    superbatched = train(tmp_path, 8, *overrides)
    assert not superbatched[2].module.automatic_optimization and reference[2].module.automatic_optimization
    steps = 19 if "max_steps" in length else 24
    assert superbatched[0]["steps_per_task"] == [steps] * 5  # global_step counts optimizer steps
    assert_same(superbatched, reference)


def test_budget_shorter_than_k_and_k_above_a_pass(tmp_path):
    # 5 steps per task with K = 8; K = 16 is more than a pass (12 steps): superbatches stop at the pass's end
    reference = train(tmp_path, 1, "trainer.max_steps=5")
    assert_same(train(tmp_path, 8, "trainer.max_steps=5"), reference)
    long_reference = train(tmp_path / "long", 1, "trainer.max_steps=30")
    assert_same(train(tmp_path / "long", 16, "trainer.max_steps=30"), long_reference)


def _groups(k, budget, skip_position=0, n=180, batch_size=16, rank=0, world_size=1):
    images = torch.arange(n)
    loader = TensorBatchLoader(images, torch.arange(n), torch.zeros(n), torch.zeros(n), batch_size, shuffle=True,
                               seed=3, rank=rank, world_size=world_size, position_source=lambda: skip_position,
                               steps_per_batch=k, budget_source=lambda: budget)
    return loader, [x for x, _, _ in loader]


def test_superbatches_are_consecutive_steps_cut_at_the_pass_end_and_the_budget():
    plain, steps = _groups(1, None)
    assert [len(s) for s in steps] == [16] * 11 + [4]
    loader, groups = _groups(8, None)
    assert len(loader) == 2 and [len(g) for g in groups] == [128, 52]
    assert torch.equal(torch.cat(groups), torch.cat(steps))
    _, groups = _groups(8, 7)  # the budget cuts the first superbatch; later ones (never trained on) are K-aligned
    assert [len(g) for g in groups] == [7 * 16, 16, 52]
    _, groups = _groups(5, 3, skip_position=12 + 6)  # second pass, from its 7th step, 3 steps left
    _, second_pass = _groups(1, None, skip_position=12)
    assert [len(g) for g in groups] == [3 * 16, 16, 16 + 4] and torch.equal(groups[0], torch.cat(second_pass[6:9]))
    for rank in (0, 1):  # DDP: each rank holds its half of every global step, grouped in the same superbatches
        _, shard_steps = _groups(1, None, rank=rank, world_size=2)
        _, shard_groups = _groups(8, None, rank=rank, world_size=2)
        assert [len(s) for s in shard_steps] == [8] * 11 + [2]  # 12 global steps of 16 (the last of 4)
        assert [len(g) for g in shard_groups] == [8 * 8, 3 * 8 + 2]
        assert torch.equal(torch.cat(shard_groups), torch.cat(shard_steps))


def _train_rows(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    # Lightning's epoch counter counts its own epochs (cut short by the task boundaries), not passes: left out
    return [{k: v for k, v in row.items() if k != "epoch"} for row in rows]


def test_train_metrics_are_logged_at_the_same_optimizer_steps(tmp_path):
    common = (*COMMON, "method=lwf", "trainer.max_steps=19", "trainer.log_every_n_steps=5", "logger=csv")
    run_train(tmp_path / "k1", *common, "steps_per_batch=1")
    run_train(tmp_path / "k8", *common, "steps_per_batch=8")
    reference, superbatched = _train_rows(tmp_path / "k1"), _train_rows(tmp_path / "k8")
    train_rows = [row for row in superbatched if row["train/loss"]]
    assert [int(row["step"]) for row in train_rows] == list(range(4, 95, 5))  # every 5th optimizer step, 0-based
    assert all(row["train/kd"] and row["train/task_loss"] for row in train_rows)
    assert superbatched == reference


def test_non_finite_loss_is_caught_and_never_checkpointed(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SYNTHETIC, "method._target_=tests.helpers.NaNAtTask", "trainer.max_steps=6",
                     "checkpoint.every_n_steps=1", "logger=none", "steps_per_batch=4", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "in task 2 at step" in proc.stderr.strip().splitlines()[-1]
    assert read_results(run_dir)["status"] == "failed"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_ddp_with_steps_per_batch_equals_k1(tmp_path):
    """Two gloo processes: every step of a superbatch all-reduces its gradients (Lightning prepares DDP's reducer
    at each `manual_backward`), so both ranks hold the weights of a K = 1 DDP run after every task."""
    from tests.test_ddp import PROTOCOL

    protocol = [o for o in PROTOCOL if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=7"]
    common = ("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "method=ewc", "deterministic=true",
              *protocol)
    for k in (1, 4):
        run_train(tmp_path / f"k{k}", *common, f"steps_per_batch={k}", "+callbacks.rank_state._target_=tests.test_ddp.RankState",
                  f"+callbacks.rank_state.folder={tmp_path}/ranks{k}")
    assert read_results(tmp_path / "k4")["acc_matrix"] == read_results(tmp_path / "k1")["acc_matrix"]
    assert read_results(tmp_path / "k4")["steps_per_task"] == [7, 7, 7]
    for dump in sorted((tmp_path / "ranks1").glob("*.pt")):
        reference = torch.load(dump, weights_only=False)["weights"]
        for rank in ("rank0", "rank1"):
            other = torch.load(tmp_path / "ranks4" / dump.name.replace("rank0", rank).replace("rank1", rank),
                               weights_only=False)["weights"]
            assert all(torch.equal(reference[k], other[k]) for k in reference), (dump.name, rank)


def test_resume_must_use_the_same_steps_per_batch(tmp_path):
    """A run continues with the K it was made with; a run made before the key existed was made with K = 1."""
    from omegaconf import OmegaConf

    from src.continual.validate import ConfigError
    from src.train import checkpoint_to_resume
    from tests.helpers import compose_config

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    saved = OmegaConf.to_container(compose_config(*SYNTHETIC, run_dir=run_dir), resolve=True)
    del saved["steps_per_batch"]
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert checkpoint_to_resume(compose_config(*SYNTHETIC, f"resume={run_dir}", run_dir=run_dir)) == last
    with pytest.raises(ConfigError, match="steps_per_batch=1.*steps_per_batch=8"):
        checkpoint_to_resume(compose_config(*SYNTHETIC, f"resume={run_dir}", "steps_per_batch=8", run_dir=run_dir))
