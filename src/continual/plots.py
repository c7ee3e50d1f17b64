"""Plots of one run: the accuracy matrix as a heatmap, average accuracy after each task, and each task's accuracy
as the sequence goes on. Tasks are numbered 1…T here, in the printed table and in `src.report`.

They are PNG only (three figures in PDF and SVG too would cost about a second more); `python -m src.report <run
folder>` draws PNG, PDF and SVG figures for a paper. matplotlib is imported inside the functions, never by a run
that draws nothing.

Importing matplotlib and drawing the three figures take ≈ 0.7 s, more than everything else after the last
evaluation together, so a run draws them only when asked (`plots=true`) or when a W&B logger will upload them;
otherwise its results.json holds everything they show, and `python -m src.continual.plots <run folder>` draws them
later (a sweep's are drawn by `python -m src.report`). A run's outputs are then complete when its process ends:
drawing them in a detached process instead would leave files appearing after the end (a race for scripts that
copy the folder) and lose them under SLURM, which ends every process of a job with the job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

FORMATS = ("png", "pdf", "svg")  # what src.report writes
RUN_FORMATS = ("png",)
# Lines that may lie on top of each other (a task that is never forgotten, two identical methods) stay visible:
# each gets its own marker and dash pattern, and the markers are hollow.
MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", "-.", ":")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_style(i: int) -> dict:
    """The i-th line's look: colour, marker and dash pattern all change, so that no two lines look alike."""
    plt = pyplot()
    return {"color": plt.cm.tab10(i % 10), "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)], "markerfacecolor": "none", "markersize": 6}


def save_figure(fig, path: Path, formats=RUN_FORMATS, dpi: int = 100) -> list[Path]:
    """`path` with each suffix of `formats`, each atomically (a crash never leaves half an image); closes `fig`."""
    path = Path(path)
    fig.tight_layout()
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        tmp = target.with_name(f".{target.name}.tmp")
        fig.savefig(tmp, dpi=dpi, format=fmt, bbox_inches="tight" if len(formats) > 1 else None)
        os.replace(tmp, target)
        written.append(target)
    pyplot().close(fig)
    return written


def task_ticks(ax, T: int, axis: str = "x", offset: int = 1) -> None:
    """Ticks at positions 0…T−1 (+ offset) labelled 1…T."""
    positions = np.arange(T) + offset
    (ax.set_xticks if axis == "x" else ax.set_yticks)(positions, [str(j + 1) for j in range(T)])


def plot_accuracy_matrix(R, path: Path, title: str = "") -> None:
    plt = pyplot()
    R = np.asarray(R, dtype=float) * 100
    T = R.shape[1]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * T, 1.0 + 0.6 * T))
    image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(T):
            if np.isnan(R[i, j]):  # not evaluated (eval.every_n_tasks, eval.tasks)
                continue
            ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", color="white" if R[i, j] < 60 else "black")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    task_ticks(ax, T, "x", offset=0)
    task_ticks(ax, R.shape[0], "y", offset=0)
    ax.set_title(title or "accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)


def plot_average_accuracy(avg_per_step, path: Path, title: str = "") -> None:
    plt = pyplot()
    steps = np.arange(1, len(avg_per_step) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    values = np.array([np.nan if v is None else v for v in avg_per_step], dtype=float) * 100
    evaluated = ~np.isnan(values)  # rows not evaluated are left out; the line joins the evaluated ones
    ax.plot(steps[evaluated], values[evaluated], **line_style(0))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("average accuracy on tasks so far (%)")
    ax.set_xticks(steps)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    save_figure(fig, path)


def draw_task_accuracy(ax, R, std=None) -> None:
    """Accuracy on task j (one line each) after training tasks 1…T, from the point task j is learned; `std` (same
    shape as R) draws a ±1 std band. A small horizontal offset per task keeps lines that coincide apart."""
    R = np.asarray(R, dtype=float) * 100  # None (not evaluated) → NaN
    n_rows, T = R.shape
    offsets = (np.arange(T) - (T - 1) / 2) * min(0.04, 0.3 / max(T, 1))
    for j in range(min(T, n_rows)):
        x = np.arange(j + 1, n_rows + 1) + offsets[j]
        evaluated = ~np.isnan(R[j:, j])  # join the evaluated rows
        ax.plot(x[evaluated], R[j:, j][evaluated], label=f"task {j + 1}", **line_style(j))
        if std is not None:
            s = np.asarray(std, dtype=float)[j:, j] * 100
            ax.fill_between(x, R[j:, j] - s, R[j:, j] + s, color=line_style(j)["color"], alpha=0.15, linewidth=0)
    ax.set_xticks(np.arange(1, n_rows + 1))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on task j (%)")
    ax.grid(alpha=0.3)


def plot_task_accuracy(R, path: Path, title: str = "") -> None:
    """Accuracy on each task as tasks are learned: forgetting is a line going down after its task."""
    plt = pyplot()
    T = np.asarray(R).shape[1]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    draw_task_accuracy(ax, R)
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7, ncol=1 if T <= 5 else 2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title)
    save_figure(fig, path)


def plot_run(results: dict, run_dir: Path) -> None:
    """The plots of one finished run: acc_matrix.png, avg_acc.png and task_acc.png."""
    run_dir = Path(run_dir)
    title = f"{results['method']} · {results['scenario']}-incremental"
    plot_accuracy_matrix(results["acc_matrix"], run_dir / "acc_matrix.png", title)
    plot_average_accuracy(results["avg_acc_per_step"], run_dir / "avg_acc.png", title)
    plot_task_accuracy(results["acc_matrix"], run_dir / "task_acc.png", title)


def main(argv: list[str]) -> int:
    """`python -m src.continual.plots <run folder>`: the plots of a run from its results.json."""
    if len(argv) != 1:
        print("usage: python -m src.continual.plots <run folder>", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    try:
        plot_run(json.loads((run_dir / "results.json").read_text()), run_dir)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {run_dir} is not a run folder with a readable results.json ({err})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
