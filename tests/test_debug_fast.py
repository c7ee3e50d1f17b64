"""`debug=fast`: every preset and method composes with it, evaluation and the Fisher are subsampled exactly as said,
and the run says so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from src.continual.validate import ConfigError, validate_config
from src.data.datamodule import TaskSequenceDataModule
from src.data.tasks import ClassSplit
from tests.helpers import ROOT, SYNTHETIC, SyntheticSource, build_loop, compose_config

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))


def _check_fast(cfg, validate: bool = True) -> None:
    try:
        if validate:
            validate_config(cfg)
    except ConfigError as err:  # a preset that starts from pretrained weights: ours (`python -m src.pretrain`
        # makes them) or a hub's, which cannot be fetched offline
        assert str(err).startswith(("model.pretrained=", "model.name=")) and (
            "no such file" in str(err) or "cannot be downloaded" in str(err)), err
    assert cfg.trainer.max_steps == 5
    assert cfg.dataset.eval_max_samples == 100 and cfg.dataset.task_pass_max_samples == 100
    instantiate(cfg.method)  # a method without a Fisher or a warm-up is not handed keys it does not take
    datamodule = instantiate(cfg.dataset, _recursive_=False)  # nothing is read: the source stays a config
    assert datamodule.eval_max_samples == 100 and datamodule.task_pass_max_samples == 100


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_with_debug_fast(experiment, tmp_path):
    _check_fast(compose_config(f"experiment={experiment}", "debug=fast", run_dir=tmp_path))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_method_and_dataset_composes_with_debug_fast(method, dataset, tmp_path):
    # text datasets take their tokenizer from a transformers model (model=hf; tests/test_hf.py runs them): here only
    # what debug=fast sets is checked
    text = dataset.startswith("text_")
    model = ["model=hf"] if text else []
    _check_fast(compose_config(f"method={method}", f"dataset={dataset}", *model, "debug=fast", run_dir=tmp_path),
                validate=not text)


def test_evaluation_subsample_is_evenly_spaced_and_the_same_every_time():
    tasks = ClassSplit(n_tasks=2, classes_per_task=2)
    dm = TaskSequenceDataModule(SyntheticSource(n_classes=4, n_train=30, n_test=20), tasks, eval_max_samples=8,
                                val_fraction=0.2)
    dm.setup()
    for split in ("test", "val"):
        for task, loader in enumerate(dm.eval_dataloaders(split)):
            full = dm._loader(split, [task], 1000, shuffle=False)
            n = len(full.index)
            assert torch.equal(loader.index, full.index[[i * n // 8 for i in range(8)]])
            assert sorted(set(loader.labels.tolist())) == [0, 1]  # both classes of the task, not the first one only
            assert torch.equal(loader.index, dm.eval_dataloaders(split)[task].index)
    assert len(next(iter(dm.task_batches(0, "train", batch_size=1000)))[0]) == 48  # no cap: every sample
    dm.task_pass_max_samples = 10
    assert len(next(iter(dm.task_batches(0, "train", batch_size=1000)))[0]) == 10
    assert len(next(iter(dm.task_batches(0, "train", batch_size=1000, max_samples=4)))[0]) == 4
    with pytest.raises(ConfigError, match=r"^dataset.eval_max_samples=0 is invalid: null \(all\) or an integer >= 1$"):
        TaskSequenceDataModule(SyntheticSource(), tasks, eval_max_samples=0)


def test_debug_fast_subsamples_evaluation_and_the_fisher_and_says_so(tmp_path):
    # 100 training and 20 test images per class: tasks of 2 classes have 40 test and 180 training samples
    loop = build_loop(tmp_path, *SYNTHETIC, "method=ewc", "debug=fast", "dataset.tasks.n_tasks=2",
                      "dataset.eval_max_samples=7", "dataset.task_pass_max_samples=50", "save_checkpoints=false")
    results = loop.run()
    assert [len(loader.index) for loader in loop.dm.eval_dataloaders("test")] == [7, 7]
    for row in results["acc_matrix"]:  # accuracies on 7 samples
        assert all(abs(7 * acc - round(7 * acc)) < 1e-6 for acc in row)
    assert [f["n_samples"] for f in results["method_summary"]["fisher_stats"]] == [50, 50]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["dataset"]["eval_max_samples"] == 7
    assert saved["config"]["dataset"]["task_pass_max_samples"] == 50


def test_debug_fast_runs_every_method(tmp_path):
    """One multirun, a job per method: each finishes and prints that its evaluation was subsampled."""
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={tmp_path}", *SYNTHETIC, "debug=fast",
           "dataset.tasks.n_tasks=2", "logger=none", "callbacks=none", "save_checkpoints=false",
           f"method={','.join(METHODS)}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("NOTE: evaluated on at most 100 test (and validation) samples per task") == len(METHODS)
    for job in range(len(METHODS)):
        results = json.loads((tmp_path / str(job) / "results.json").read_text())
        assert results["status"] == "finished" and results["steps_per_task"] == [5, 5]
