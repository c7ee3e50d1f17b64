"""`python -m src.report` on a folder of runs made here: a real sweep (2 methods × 2 seeds), a run that failed, one
whose results.json is unreadable and one that died before writing any."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from src.report import Run, hyperparameter_keys
from tests.helpers import ROOT, SYNTHETIC, build_loop, read_results

TINY = (*SYNTHETIC, "dataset.tasks.n_tasks=2", "trainer.max_steps=2", "callbacks=none", "logger=none",
        "save_checkpoints=false")


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    cmd = [sys.executable, "-m", "src.train", "-m", f"hydra.sweep.dir={sweep}", *TINY, "method=finetune,joint",
           "seed=0,1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a run that failed in its second task (results.json says so, with the error)
    loop = build_loop(sweep / "failed", *TINY[:-3], "method=finetune", "seed=7")

    def fail(task, module, datamodule):
        if task == 1:
            raise RuntimeError("boom in task 2")

    loop.module.regularizer.on_task_end = fail
    with pytest.raises(RuntimeError):
        loop.run()
    # a results.json cut short (a disk filled up, a copy went wrong)
    shutil.copytree(sweep / "1", sweep / "truncated")
    text = (sweep / "truncated" / "results.json").read_text()
    (sweep / "truncated" / "results.json").write_text(text[: len(text) // 2])
    # a job that died before its first results.json
    (sweep / "died" / ".hydra").mkdir(parents=True)
    shutil.copy(sweep / "0" / ".hydra" / "config.yaml", sweep / "died" / ".hydra" / "config.yaml")
    return sweep


def run_report(*args):
    proc = subprocess.run([sys.executable, "-m", "src.report", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return proc


def test_report_table_plots_and_broken_runs(runs_folder, tmp_path):
    out = tmp_path / "out"
    proc = run_report(runs_folder, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "7 runs, 4 finished in 2 groups" in proc.stdout
    for name in ("report.md", "report.csv", "report_runs.csv", "report_avg_acc.png", "report_final_acc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report_avg_acc.png").read_bytes()[:4] == b"\x89PNG"

    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [(r["method"], r["scenario"], r["dataset"], r["seeds"], r["hyperparameters"]) for r in rows] == [
        ("finetune", "task", "split_fmnist", "0 1", ""), ("joint", "task", "split_fmnist", "0 1", "")]
    for row in rows:
        results = [r for r in map(read_results, (runs_folder / job for job in "0123")) if r["method"] == row["method"]]
        assert sorted(r["config"]["seed"] for r in results) == [0, 1]
        for metric in ("avg_acc", "forgetting", "bwt", "fwt", "wall_time_s"):
            values = [r[metric] for r in results]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values))
            assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1))

    md = (out / "report.md").read_text()
    finetune = next(line for line in md.splitlines() if line.startswith("| split_fmnist | task | finetune"))
    mean, std = float(rows[0]["avg_acc_mean"]), float(rows[0]["avg_acc_std"])
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in finetune
    broken = md.split("## Failed or incomplete runs")[1]
    assert "| failed/run | failed | RuntimeError: boom in task 2 |" in broken
    assert "| truncated | unreadable | results.json: JSONDecodeError" in broken
    assert "| died | no results.json |" in broken

    listed = list(csv.DictReader(open(out / "report_runs.csv")))
    statuses = {r["run"]: r["status"] for r in listed}
    # no .hydra/ record for the run made in-process: the dataset comes from its name
    assert next(r for r in listed if r["run"] == "failed/run")["dataset"] == "split_fmnist"
    assert statuses == {"0": "finished", "1": "finished", "2": "finished", "3": "finished",
                        "failed/run": "failed", "truncated": "unreadable", "died": "no results.json"}


def test_report_defaults_to_the_first_path_and_takes_run_folders(runs_folder):
    proc = run_report(runs_folder / "0", runs_folder / "1")  # finetune, seeds 0 and 1
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(runs_folder / "0" / "report.csv")))
    assert len(rows) == 1 and rows[0]["seeds"] == "0 1" and rows[0]["n_runs"] == "2"
    for name in ("report.md", "report.csv", "report_runs.csv", "report_avg_acc.png", "report_final_acc.png"):
        os.remove(runs_folder / "0" / name)


def test_report_of_nothing_says_so(tmp_path):
    proc = run_report(tmp_path)
    assert proc.returncode == 2 and "no run folders" in proc.stderr
    assert run_report(tmp_path / "missing").returncode == 2


def _run(method, seed, **config):
    base = {"seed": seed, "dataset.seed": seed, "method._target_": method, "optimizer.lr": 0.001,
            "paths.output_dir": f"/tmp/{method}{seed}", "trainer.log_every_n_steps": 50}
    return Run(path=None, status="finished", method=method, dataset="d", scenario="task", seed=seed,
               config={**base, **{k.replace("__", "."): v for k, v in config.items()}})


def test_hyperparameters_are_the_keys_that_differ_apart_from_seeds_and_bookkeeping():
    runs = [_run("finetune", 0), _run("finetune", 1), _run("ewc", 0, method__lam=1.0, method__seed=0),
            _run("ewc", 1, method__lam=1.0, method__seed=1)]
    assert hyperparameter_keys(runs) == []  # method-only keys are explained by the method column
    runs += [_run("ewc", 0, method__lam=10.0, method__seed=0)]
    assert hyperparameter_keys(runs) == ["method.lam"]
    runs += [_run("finetune", 0, optimizer__lr=0.01)]
    runs[-1].config["optimizer.lr"] = 0.01
    assert hyperparameter_keys(runs) == ["method.lam", "optimizer.lr"]
