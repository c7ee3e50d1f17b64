"""`python -m src.report` on a folder of runs made here: a real sweep (2 methods × 2 seeds), a run that failed, one
whose results.json is unreadable and one that died before writing any."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from src.continual.plots import plot_run
from src.continual.results import format_table
from src.report import Run, hyperparameter_keys
from src.report import main as report_main
from tests.helpers import ROOT, SYNTHETIC, build_loop, read_results

FIGURES = [f"report_{name}.{fmt}" for name in ("avg_acc", "final_acc", "task_acc") for fmt in ("png", "pdf", "svg")]
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
    for name in ("report.md", "report.csv", "report_runs.csv", *FIGURES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report_avg_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report_task_acc.pdf").read_bytes()[:4] == b"%PDF"
    assert b"<svg" in (out / "report_final_acc.svg").read_bytes()[:2000]

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
    broken = md.split("## Failed, interrupted or incomplete runs")[1]
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
    for name in ("report.md", "report.csv", "report_runs.csv", *FIGURES):
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


# ---- hand-made results.json files: what the table says, exactly ------------------------------------------------
EWC = {"_target_": "src.methods.ewc.EWC", "lambda": 10000.0, "mode": "separate", "gamma": 1.0, "fisher": "exact",
       "fisher_samples": None, "fisher_batch_size": 500, "seed": 0}
LWF = {"_target_": "src.methods.lwf.LwF", "alpha": 0.3, "temperature": 2.0, "t_squared": True, "weighting": "convex",
       "lambda_o": 1.0, "distill": "old", "warmup_epochs": 0, "warmup_lr": 0.001}
FINETUNE = {"_target_": "src.methods.finetune.Finetune"}


def fake_run(folder, method="ewc", method_config=None, scenario="task", seed=0, status="finished", error=None,
             R=((0.9, 0.2), (0.7, 0.8)), val_avg_acc=0.76, eval_max_samples=None):
    """A results.json as the task loop writes it (2 tasks), with the metrics of `R` (avg_acc = mean of the last row)."""
    R = [list(row) for row in R]
    config = {"seed": seed, "name": f"{method}-split_fmnist-{scenario}",
              "dataset": {"seed": seed, "batch_size": 128, "eval_max_samples": eval_max_samples},
              "method": dict(method_config or {"ewc": EWC, "lwf": LWF}.get(method, FINETUNE), seed=seed),
              "optimizer": {"lr": 0.001}, "paths": {"output_dir": str(folder)}}
    if method == "finetune":
        del config["method"]["seed"]
    results = {"status": status, "error": error, "config": config, "method": method, "scenario": scenario,
               "n_tasks": 2, "random_init_acc": [0.5, 0.5], "acc_matrix": R if status == "finished" else R[:1],
               "avg_acc_per_step": [R[0][0], sum(R[1]) / 2], "avg_acc": sum(R[1]) / 2 if status == "finished" else None,
               "forgetting": R[0][0] - R[1][0], "bwt": R[1][0] - R[0][0], "fwt": R[0][1] - 0.5,
               "val_avg_acc": val_avg_acc, "wall_time_s": 1.0}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))
    return results


def report_lines(capsys, *args):
    """`python -m src.report` in-process: its return code, what it printed, and report.md."""
    code = report_main([str(a) for a in args])
    printed = capsys.readouterr().out
    return code, printed


def test_report_states_effective_hyperparameters_sorts_numbers_and_prints_the_table(tmp_path, capsys):
    for i, lam in enumerate((1859.0, 19549.0, 1962.0, 4136.0)):
        fake_run(tmp_path / f"ewc{i}", method_config={**EWC, "lambda": lam}, R=((0.9, 0.2), (0.7, 0.8 + i / 100)))
    fake_run(tmp_path / "lwf", "lwf")
    fake_run(tmp_path / "finetune", "finetune")
    code, printed = report_lines(capsys, tmp_path, "--out", tmp_path / "out", "--latex")
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert [r["method"] for r in rows] == ["finetune", "ewc", "ewc", "ewc", "ewc", "lwf"]
    # numbers sort as numbers (as text 19549 would come before 1962), and every default is stated
    assert [r["hyperparameters"] for r in rows[1:5]] == [
        f"lambda={lam}, mode=separate, fisher=exact, fisher_samples=null" for lam in (1859, 1962, 4136, 19549)]
    assert rows[5]["hyperparameters"] == "alpha=0.3, temperature=2, t_squared=true, weighting=convex, warmup_epochs=0"
    assert rows[0]["hyperparameters"] == "" and rows[1]["varied"] == "method.lambda=1859"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| split_fmnist | task | ewc | **lambda=1859**, mode=separate, fisher=exact, fisher_samples=null | 0 |" in md
    assert "Varied between groups: method.lambda." in md
    # the validation column, and the same table on the terminal
    assert "val avg acc (%)" in md and "| 76.00 |" in md
    lines = printed.splitlines()
    assert lines[0].split()[:5] == ["dataset", "scenario", "method", "hyperparameters", "seeds"]
    ewc_lines = [line for line in lines if "  ewc  " in line]
    assert [line.split("lambda=")[1].split(",")[0] for line in ewc_lines] == ["1859", "1962", "4136", "19549"]
    assert ewc_lines[0].split()[-6:] == ["75.00", "76.00", "20.00", "-20.00", "-30.00", "1.0"]
    assert "6 runs, 6 finished in 6 groups" in printed
    # the LaTeX table: booktabs, mean ± std in math mode, escaped underscores, one row per group
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and tex.count(" \\\\\n") == 7
    assert ("split\\_fmnist & task & ewc & lambda=19549, mode=separate, fisher=exact, fisher\\_samples=null & 1 & "
            "$75.50$ & $76.00$ & $20.00$ & $-20.00$ & $-30.00$ & $1.0$ \\\\") in tex


def test_report_means_and_stds_over_seeds_and_gated_keys(tmp_path, capsys):
    fake_run(tmp_path / "a", method_config={**EWC, "mode": "online", "gamma": 0.9}, seed=0, R=((1, 0), (0.6, 0.8)))
    fake_run(tmp_path / "b", method_config={**EWC, "mode": "online", "gamma": 0.9}, seed=1, R=((1, 0), (0.8, 0.8)))
    report_lines(capsys, tmp_path, "--out", tmp_path / "out")
    (row,) = list(csv.DictReader(open(tmp_path / "out" / "report.csv")))
    assert row["hyperparameters"] == "lambda=10000, mode=online, gamma=0.9, fisher=exact, fisher_samples=null"
    assert row["seeds"] == "0 1"
    assert float(row["avg_acc_mean"]) == pytest.approx(0.75) and float(row["avg_acc_std"]) == pytest.approx(
        np.std([0.7, 0.8], ddof=1))


def test_fwt_is_left_out_for_class_incremental_runs(tmp_path, capsys):
    fake_run(tmp_path / "class", "finetune", scenario="class")
    code, printed = report_lines(capsys, tmp_path, "--out", tmp_path / "only_class")
    header = next(line for line in (tmp_path / "only_class" / "report.md").read_text().splitlines()
                  if line.startswith("| dataset"))
    assert "BWT (%)" in header and "FWT" not in header
    assert "FWT" not in printed.splitlines()[0]
    fake_run(tmp_path / "task", "finetune", scenario="task")
    code, printed = report_lines(capsys, tmp_path, "--out", tmp_path / "mixed")
    md = (tmp_path / "mixed" / "report.md").read_text()
    assert "| split_fmnist | class | finetune | — | 0 | 75.00 | 76.00 | 20.00 | -20.00 | — | 1.0 |" in md
    assert "| split_fmnist | task | finetune | — | 0 | 75.00 | 76.00 | 20.00 | -20.00 | -30.00 | 1.0 |" in md
    assert "FWT is left out (—) for class-incremental rows" in md


def test_failed_interrupted_and_subsampled_runs_are_listed_with_their_reason(tmp_path, capsys):
    fake_run(tmp_path / "ok", "finetune", eval_max_samples=200)
    fake_run(tmp_path / "failed", "finetune", status="failed", error="ConfigError: seed=-1 is invalid: an integer >= 0")
    fake_run(tmp_path / "interrupted", "finetune", status="interrupted", error="interrupted by SIGTERM")
    fake_run(tmp_path / "killed", "finetune", status="running")
    (tmp_path / "early" / "results.json").parent.mkdir()  # refused before training: status and reason only
    (tmp_path / "early" / "results.json").write_text(json.dumps(
        {"status": "failed", "error": "optimizer.lr=-0.1 is invalid: a number > 0"}))
    code, printed = report_lines(capsys, tmp_path, "--out", tmp_path / "out")
    assert code == 0
    md = (tmp_path / "out" / "report.md").read_text()
    broken = md.split("## Failed, interrupted or incomplete runs")[1]
    assert "| failed | failed | ConfigError: seed=-1 is invalid: an integer >= 0 |" in broken
    assert "| interrupted | interrupted | interrupted by SIGTERM |" in broken
    assert "| killed | running | still running, or killed without a chance to say so" in broken
    assert "| early | failed | optimizer.lr=-0.1 is invalid: a number > 0 |" in broken
    assert "not finished: interrupted (interrupted: interrupted by SIGTERM)" in printed
    assert "not finished: failed (failed: ConfigError: seed=-1 is invalid" in printed
    assert "WARNING: 1 rows were evaluated on a subsample" in md and "WARNING: 1 rows" in printed


def test_optuna_search_names_its_objective_and_best_trial_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    values = [0.91, 0.97, 0.95]
    for i, (lam, value) in enumerate(zip((10.0, 4136.25, 200.0), values, strict=True)):
        fake_run(sweep / str(i), method_config={**EWC, "lambda": lam}, val_avg_acc=value)
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  method.lambda: 4136.25\nbest_value: 0.97\n")
    (sweep / "multirun.yaml").write_text("hydra:\n  sweeper:\n    direction: maximize\n    n_trials: 3\n")
    code, printed = report_lines(capsys, sweep)
    md = (sweep / "report.md").read_text()
    assert ("objective = validation average accuracy (val_avg_acc), as a fraction in [0, 1] (what "
            "`python -m src.train` returns), maximized; 3 trials asked, 3 finished runs found.") in md
    assert (f"Best trial: `{sweep / '1'}` with method.lambda=4136.25: objective 0.97 (97.00%); test average accuracy "
            "75.00%.") in md
    assert f"Best trial: {sweep / '1'} with method.lambda=4136.25" in printed


def test_run_plots_and_printed_table_number_tasks_from_one(tmp_path):
    results = fake_run(tmp_path, "finetune", scenario="class", eval_max_samples=100)
    plot_run(results, tmp_path)
    for name in ("acc_matrix", "avg_acc", "task_acc"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(results)
    assert table.splitlines()[0].split() == ["after", "\\", "on", "T1", "T2", "avg"]
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["init", "T1", "T2"]
    assert "fwt n/a in class-IL" in table and "dataset.eval_max_samples=100" in table


def test_plots_and_report_import_matplotlib_only_when_they_draw():
    code = "import sys, src.continual.plots, src.continual.results, src.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
