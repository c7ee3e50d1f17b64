"""Continual-learning metrics as pure functions of the accuracy matrix.

R[i][j] is the accuracy on task j after training tasks 0…i (T×T); b[j] is the accuracy of the untrained model on
task j. Definitions:

- average accuracy after step i: mean over the tasks seen so far, (1/(i+1)) Σ_{j≤i} R[i][j]; "final" is i = T-1.
- forgetting (Chaudhry et al. 2018): for each task j < T-1, the best accuracy it ever had before the end,
  max_{l ≤ T-2} R[l][j], minus its final accuracy R[T-1][j]; averaged over j = 0…T-2.
- BWT (Lopez-Paz & Ranzato 2017): (1/(T-1)) Σ_{j<T-1} (R[T-1][j] − R[j][j]); negative means forgetting.
- FWT (Lopez-Paz & Ranzato 2017): (1/(T-1)) Σ_{j≥1} (R[j-1][j] − b[j]); how much earlier tasks help a task before it
  is trained. In class-incremental learning an unseen task's classes are inactive, so R[j-1][j] = 0 and FWT = −mean b.

With a single task, forgetting, BWT and FWT are undefined and returned as None.
"""

from __future__ import annotations

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square, got shape {R.shape}")
    return R


def average_accuracy_per_step(R) -> list[float]:
    """Works on a partial matrix too (the rows of the tasks trained so far)."""
    R = np.asarray(R, dtype=float)
    return [float(R[i, : i + 1].mean()) for i in range(len(R))]


def average_accuracy(R) -> float:
    R = _matrix(R)
    return float(R[-1].mean())


def forgetting(R) -> float | None:
    R = _matrix(R)
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[: T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, random_init_acc) -> float | None:
    R = _matrix(R)
    b = np.asarray(random_init_acc, dtype=float)
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def summarize(R, random_init_acc) -> dict:
    """All metrics of a (complete) run, keyed as in results.json."""
    return {
        "avg_acc": average_accuracy(R),
        "avg_acc_per_step": average_accuracy_per_step(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, random_init_acc),
    }
