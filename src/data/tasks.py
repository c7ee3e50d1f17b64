"""How a labelled dataset becomes a sequence of tasks.

A task is a set of sample indices into the source's tensors plus each sample's *local* label (0…classes_per_task-1).
The scenario (task-, domain- or class-incremental) later decides which label the model is trained on; the global
label of a sample is always `task * classes_per_task + local_label`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.data.download import DatasetError


@dataclass
class Task:
    """One task's samples: indices into the source tensors and local labels, for each split."""

    classes: list[int]  # the source's class ids, in local-label order
    train_index: torch.Tensor
    train_label: torch.Tensor
    val_index: torch.Tensor
    val_label: torch.Tensor
    test_index: torch.Tensor
    test_label: torch.Tensor


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, held_out) with `fraction` of every class held out, reproducibly from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


class ClassSplit:
    """Split the classes into `n_tasks` disjoint groups of `classes_per_task` (Split MNIST, Split CIFAR, …).

    `class_order` fixes the order explicitly; otherwise `shuffle_seed` shuffles it reproducibly, and with neither the
    natural order 0,1,2,… is used, so task 0 holds classes (0, 1), task 1 (2, 3), and so on.
    """

    def __init__(
        self,
        n_tasks: int,
        classes_per_task: int,
        class_order: list[int] | None = None,
        shuffle_seed: int | None = None,
    ):
        self.n_tasks, self.classes_per_task = n_tasks, classes_per_task
        self.class_order, self.shuffle_seed = class_order, shuffle_seed

    def order(self, n_classes: int) -> list[int]:
        """The class ids in task order (only the first n_tasks × classes_per_task are used)."""
        if self.class_order is not None:
            order = [int(c) for c in self.class_order]
            if sorted(set(order)) != sorted(order) or not all(0 <= c < n_classes for c in order):
                raise DatasetError(
                    f"dataset.tasks.class_order: {order} must list distinct class ids in [0, {n_classes})"
                )
        elif self.shuffle_seed is not None:
            order = torch.randperm(n_classes, generator=torch.Generator().manual_seed(self.shuffle_seed)).tolist()
        else:
            order = list(range(n_classes))
        needed = self.n_tasks * self.classes_per_task
        if needed > len(order):
            raise DatasetError(
                f"dataset.tasks: n_tasks × classes_per_task = {self.n_tasks} × {self.classes_per_task} = {needed} "
                f"needs more classes than the {len(order)} available"
            )
        return order[:needed]

    def build(self, train_y, test_y, n_classes, val_fraction, seed) -> list[Task]:
        order = self.order(n_classes)
        position = torch.full((n_classes,), -1, dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(order))
        train_idx, val_idx = stratified_split(train_y, val_fraction, seed)

        def per_task(index, labels, t):
            pos = position[labels[index]]
            mine = (pos >= 0) & (pos // self.classes_per_task == t)
            return index[mine], pos[mine] % self.classes_per_task

        all_test = torch.arange(len(test_y))
        tasks = []
        for t in range(self.n_tasks):
            classes = order[t * self.classes_per_task : (t + 1) * self.classes_per_task]
            tasks.append(
                Task(classes, *per_task(train_idx, train_y, t), *per_task(val_idx, train_y, t),
                     *per_task(all_test, test_y, t))
            )
        return tasks

    def batch_transform(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Split tasks see the images as they are."""
        return x
