"""eval.every_n_tasks and eval.tasks=seen_and_next: the cells not evaluated are null in results.json, and metrics,
the printed table, plots and the report cope with them."""

from __future__ import annotations

from src.continual import metrics
from src.continual.results import format_table
from tests.helpers import SYNTHETIC, build_loop, read_results

TINY = (*SYNTHETIC, "dataset.tasks.n_tasks=5", "dataset.tasks.classes_per_task=2", "trainer.max_steps=3",
        "save_checkpoints=false")


def evaluated(R):
    return [[j for j, v in enumerate(row) if v is not None] for row in R]


def test_every_n_tasks_skips_rows_but_never_the_last(tmp_path):
    loop = build_loop(tmp_path, *TINY, "eval.every_n_tasks=2", "plots=true")  # plots of a matrix with null rows
    results = loop.run()
    assert evaluated(results["acc_matrix"]) == [[], [0, 1, 2, 3, 4], [], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert evaluated(results["val_acc_matrix"]) == evaluated(results["acc_matrix"])
    assert len(results["random_init_acc"]) == 5  # b (for FWT) is evaluated once on every task
    R = results["acc_matrix"]
    assert results["avg_acc"] == metrics.average_accuracy(R) is not None
    assert results["bwt"] is None and results["fwt"] is None  # they need rows 0 and 2
    assert results["forgetting_exact"] is False
    assert [v is None for v in results["avg_acc_per_step"]] == [True, False, True, False, False]
    assert results["val_avg_acc"] is not None
    on_disk = read_results(loop.run_dir)
    assert on_disk["acc_matrix"][0] == [None] * 5  # null in the file
    assert "null" in (loop.run_dir / "results.json").read_text()
    assert (loop.run_dir / "acc_matrix.png").is_file() and (loop.run_dir / "avg_acc.png").is_file()
    table = format_table(results)
    assert table.splitlines()[2 + 1].split()[1:] == ["-"] * 5  # row T1: five cells not evaluated
    costs = results["task_costs"]
    assert len(costs) == 5 and costs[0]["eval_s"] < costs[1]["eval_s"] and costs[0]["eval_cpu_s"] < costs[1]["eval_cpu_s"]


def test_seen_and_next_evaluates_tasks_so_far_and_the_next(tmp_path):
    loop = build_loop(tmp_path, *TINY, "eval.tasks=seen_and_next")
    results = loop.run()
    assert evaluated(results["acc_matrix"]) == [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    R = results["acc_matrix"]
    # the exact metrics are all there; forgetting misses the cells before each task's training
    assert None not in results["avg_acc_per_step"]
    assert results["bwt"] == metrics.backward_transfer(R) is not None
    assert results["fwt"] == metrics.forward_transfer(R, results["random_init_acc"]) is not None
    assert results["forgetting"] is not None and results["forgetting_exact"] is False
    # the report reads such a run
    from src.report import report

    summary = report([loop.run_dir], out=tmp_path / "report")
    assert len(summary["runs"]) == 1 and (tmp_path / "report" / "report.md").is_file()
    assert "nan" not in (tmp_path / "report" / "report.md").read_text().lower()
