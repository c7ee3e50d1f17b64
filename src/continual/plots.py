"""Plots of one run: the accuracy matrix as a heatmap and average accuracy after each task."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_accuracy_matrix(R, path: Path, title: str = "") -> None:
    R = np.asarray(R, dtype=float) * 100
    T = R.shape[1]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * T, 1.0 + 0.6 * T))
    image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(T):
            ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", color="white" if R[i, j] < 60 else "black")
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(T))
    ax.set_yticks(range(R.shape[0]))
    ax.set_title(title or "accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Atomically: a crash never leaves half an image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_average_accuracy(avg_per_step, path: Path, title: str = "") -> None:
    steps = np.arange(1, len(avg_per_step) + 1)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(steps, np.asarray(avg_per_step) * 100, marker="o")
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("average accuracy on tasks so far (%)")
    ax.set_xticks(steps)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    _save(fig, path)
