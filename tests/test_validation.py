"""Bad input fails before any work with one line naming the key; non-finite losses stop the run cleanly;
result files are written atomically; runs are deterministic under a seed."""

import json

import pytest
import torch

from src.continual.results import write_json_atomic
from src.continual.validate import ConfigError, validate_config
from tests.helpers import FMNIST_SYSTEM_DIR, ROOT, SYNTHETIC, build_loop, compose_config, read_results, run_train

BAD = [
    (["method=ewc", "method.lambda=-1"], "method.lambda=-1"),
    (["method=lwf", "method.temperature=0"], "method.temperature=0"),
    (["method=lwf", "method.alpha=1.5"], "method.alpha=1.5"),
    (["dataset.tasks.classes_per_task=3", "dataset.tasks.n_tasks=3"], "dataset.tasks.classes_per_task=3"),
    (["dataset.tasks.classes_per_task=1", "dataset.tasks.n_tasks=11"], "dataset.tasks.n_tasks=11"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["dataset.batch_size=0"], "dataset.batch_size=0"),
    (["dataset.eval_batch_size=-1"], "dataset.eval_batch_size=-1"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction=1.0"),
    (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps=-1"),
    (["steps_per_batch=0"], "steps_per_batch=0"),
    (["steps_per_batch=2.5"], "steps_per_batch=2.5"),
    (["steps_per_batch=4", "trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0"),
    (["steps_per_batch=4", "+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2"),
    (["dataset.data_on_device=maybe"], "dataset.data_on_device='maybe'"),
    (["scenario=class", "scenario.train_classes=new"], "scenario.train_classes='new'"),
    ([*SYNTHETIC, "model=convnet", "+dataset.source.shape=[64]"], "model=convnet"),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[b[1] for b in BAD])
def test_bad_value_is_one_line_naming_the_key(tmp_path, overrides, expected):
    if any(o.startswith("method=") and not (ROOT / "conf/method" / f"{o[7:]}.yaml").exists() for o in overrides):
        pytest.skip("method not available")
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(*overrides, run_dir=tmp_path))
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_valid_default_config_passes(tmp_path):
    validate_config(compose_config(run_dir=tmp_path))


def test_unknown_group_option_lists_the_options(tmp_path):
    proc = run_train(tmp_path / "run", "method=nope", check=False)
    assert proc.returncode != 0
    assert "Could not find 'method/nope'" in proc.stderr and "finetune" in proc.stderr


def test_bad_value_through_the_cli_exits_non_zero_before_any_results(tmp_path):
    proc = run_train(tmp_path / "run", "dataset.tasks.classes_per_task=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset.tasks.classes_per_task=3 is invalid")
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_non_finite_loss_stops_with_task_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SYNTHETIC, "method._target_=tests.helpers.NaNAtTask", "trainer.max_steps=4",
                     "logger=none", check=False)
    assert proc.returncode == 3
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "in task 2 at step" in last
    results = read_results(run_dir)
    assert results["status"] == "failed" and "non-finite loss" in results["error"]
    assert len(results["acc_matrix"]) == 2
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_no_checkpoint_is_written_after_a_non_finite_loss(tmp_path):
    """Losses are checked lazily (a flag on the device), but always before a checkpoint is saved."""
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SYNTHETIC, "method._target_=tests.helpers.NaNAtTask", "trainer.max_steps=6",
                     "checkpoint.every_n_steps=1", "logger=none", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["continual"]["task"] == 2 and ckpt["continual"]["phase"] == "training"  # a step checkpoint in task 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_learning_rate_that_blows_up_fails_the_run(tmp_path):
    loop = build_loop(tmp_path, *SYNTHETIC, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_steps=20")
    with pytest.raises(Exception, match="non-finite loss"):
        loop.run()
    assert json.loads((loop.run_dir / "results.json").read_text())["status"] == "failed"


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "running", "acc_matrix": [[0.5]]})

    def explode(data, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", explode)
    with pytest.raises(OSError):
        write_json_atomic(path, {"status": "finished"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "running", "acc_matrix": [[0.5]]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    overrides = ("deterministic=true", "trainer.max_steps=30", "dataset.tasks.shuffle_seed=3", "model.dropout=0.2")
    first = build_loop(tmp_path / "a", *overrides).run()
    second = build_loop(tmp_path / "b", *overrides).run()
    for key in ("acc_matrix", "random_init_acc", "val_acc_matrix", "avg_acc", "forgetting", "bwt", "fwt",
                "task_classes"):
        assert first[key] == second[key], key
    other = build_loop(tmp_path / "c", *overrides[:-1], "seed=1", "model.dropout=0.2").run()
    assert other["acc_matrix"] != first["acc_matrix"]
