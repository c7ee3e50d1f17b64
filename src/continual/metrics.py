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

Cells not evaluated (`eval.every_n_tasks` > 1, `eval.tasks: seen_and_next`) are None (null in results.json). A
metric is computed only where every cell it needs was evaluated, else it is None:
- average accuracy after step i: row i on tasks 0…i (with `seen_and_next`: every evaluated row; with every_n_tasks:
  the evaluated rows only). Final average accuracy: the last row, always evaluated on every task.
- BWT: the last row and the diagonal R[j][j] (with every_n_tasks > 1 the diagonal of skipped rows is missing).
- FWT: R[j−1][j] (evaluated with `seen_and_next`, on the rows not skipped) and b.
- forgetting needs R[l][j] for every l ≤ T−2, including the rows before task j was trained, which `seen_and_next`
  does not evaluate: it is then taken over the evaluated rows (`forgetting_exact: false` in results.json): exact as
  long as no skipped cell held a task's best accuracy before the end — for tasks not yet trained (chance level)
  practically always; with skipped rows (every_n_tasks > 1) a drop-then-recovery between evaluations is missed.
"""

from __future__ import annotations

import numpy as np


def as_array(R) -> np.ndarray:
    """R as floats, with NaN where a cell was not evaluated (None)."""
    return np.array([[np.nan if v is None else v for v in row] for row in R], dtype=float).reshape(len(R), -1)


def _matrix(R) -> np.ndarray:
    R = as_array(R)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be square, got shape {R.shape}")
    return R


def _mean_if_complete(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return None if np.isnan(values).any() else float(values.mean())


def average_accuracy_per_step(R) -> list[float | None]:
    """Works on a partial matrix too (the rows of the tasks trained so far); None for a row not evaluated on every
    task seen."""
    R = as_array(R)
    return [_mean_if_complete(R[i, : i + 1]) for i in range(len(R))]


def average_accuracy(R) -> float | None:
    R = _matrix(R)
    return _mean_if_complete(R[-1])


def forgetting(R) -> float | None:
    """Over the evaluated cells of rows 0…T−2 (see `forgetting_is_exact`); None when a task has none, or the last row
    misses one."""
    R = _matrix(R)
    T = len(R)
    if T < 2:
        return None
    earlier = R[: T - 1, : T - 1]
    if np.isnan(R[T - 1, : T - 1]).any() or np.isnan(earlier).all(axis=0).any():
        return None
    return float(np.mean([np.nanmax(earlier[:, j]) - R[T - 1, j] for j in range(T - 1)]))


def forgetting_is_exact(R) -> bool:
    """Whether forgetting saw every cell its definition takes the maximum over."""
    R = _matrix(R)
    return not np.isnan(R[: len(R) - 1, : len(R) - 1]).any()


def backward_transfer(R) -> float | None:
    R = _matrix(R)
    T = len(R)
    if T < 2:
        return None
    return _mean_if_complete([R[T - 1, j] - R[j, j] for j in range(T - 1)])


def forward_transfer(R, random_init_acc) -> float | None:
    R = _matrix(R)
    b = np.array([np.nan if v is None else v for v in random_init_acc], dtype=float)
    T = len(R)
    if T < 2:
        return None
    return _mean_if_complete([R[j - 1, j] - b[j] for j in range(1, T)])


def summarize(R, random_init_acc) -> dict:
    """All metrics of a (complete) run, keyed as in results.json."""
    return {
        "avg_acc": average_accuracy(R),
        "avg_acc_per_step": average_accuracy_per_step(R),
        "forgetting": forgetting(R),
        "forgetting_exact": forgetting_is_exact(R) if len(R) > 1 else None,
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, random_init_acc),
    }
