"""`python -m src.train` run as a user runs it (a subprocess with Hydra overrides), for every method × scenario."""

import pytest

from tests.helpers import FMNIST_SYSTEM_DIR, read_results, run_train

pytestmark = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
@pytest.mark.parametrize("method", ["finetune", "joint", "ewc", "lwf"])
def test_short_run_fills_the_run_folder(tmp_path, method, scenario):
    run_dir = tmp_path / "run"
    fisher = ["method.fisher_samples=300"] if method == "ewc" else []  # what fills the folder, not the numbers
    proc = run_train(run_dir, f"method={method}", f"scenario={scenario}", "trainer.max_steps=5",
                     "trainer.log_every_n_steps=1", "dataset.eval_max_samples=300", *fisher,
                     f"plots={str(scenario == 'task').lower()}")
    results = read_results(run_dir)
    assert results["status"] == "finished" and results["method"] == method and results["scenario"] == scenario
    R = results["acc_matrix"]
    assert len(R) == 5 and all(len(row) == 5 for row in R)
    assert all(0.0 <= a <= 1.0 for row in R for a in row)
    assert results["steps_per_task"] == [5] * 5
    if method == "ewc":  # the Fisher statistics of every task reach results.json
        stats = results["method_summary"]["fisher_stats"]
        assert [s["task"] for s in stats] == list(range(5)) and all(s["mean"] > 0 for s in stats)
    for name in ("config.yaml", "results.json", "train.log", "checkpoints/last.ckpt", "csv/metrics.csv",
                 ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    for name in ("acc_matrix", "avg_acc", "task_acc"):  # plots: the default is true (plots=false: test_startup)
        assert (run_dir / f"{name}.png").is_file() == (scenario == "task"), name
        if scenario == "task":
            assert (run_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    assert "after \\ on" in proc.stdout and "avg_acc" in proc.stdout  # the table printed at the end
    assert "task 5/5 done" in (run_dir / "train.log").read_text()
    csv_header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in csv_header and "eval/acc_task_0" in csv_header


def test_default_job_and_two_epochs_per_task(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "method=joint", "scenario=task", "trainer.max_epochs=2", "dataset.tasks.n_tasks=2",
              "logger=tensorboard")
    results = read_results(run_dir)
    # 2 epochs of task 0 (10,800 images / 128 = 85 batches); task 1 joint: 21,600 images = 169 batches
    assert results["steps_per_task"] == [2 * 85, 2 * 169]
    assert results["avg_acc"] > 0.9
    assert any((run_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_hydra_help_and_config_dump():
    import subprocess
    import sys

    from tests.helpers import ROOT

    help_out = subprocess.run([sys.executable, "-m", "src.train", "--help"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    for group in ("method:", "dataset:", "model:", "scenario:", "trainer:", "logger:", "callbacks:", "experiment:"):
        assert group in help_out
    job = subprocess.run([sys.executable, "-m", "src.train", "--cfg", "job", "method=joint"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "_target_: src.methods.joint.Joint" in job and "seed: 0" in job
    assert "\nplots: true\n" in job  # a run draws its plots unless told not to


def test_permutations_are_saved_so_the_run_can_be_reproduced(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, "dataset=permuted_fmnist", "scenario=domain", "trainer.max_steps=2", "logger=none",
              "save_checkpoints=false", "dataset.tasks.n_tasks=3")
    tasks = read_results(run_dir)["tasks"]
    assert tasks["type"] == "Permutations" and len(tasks["permutations"]) == 3
    assert all(sorted(p) == list(range(784)) for p in tasks["permutations"])
