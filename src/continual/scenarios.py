"""The three scenarios of van de Ven & Tolias (2019): which outputs the model has and which it may use.

Every scenario owns one linear output layer of `n_outputs` units and answers two questions: which logits and targets
train the current batch, and which logits are scored at evaluation. Samples carry their task id and local label;
the global label is `task * classes_per_task + local`.

- task-incremental: one head per task, and the task id is given. The heads are the column blocks of one layer
  (block t = task t's classes): a gather picks each sample's block, equivalent to separate heads, in one matmul.
- class-incremental: one single head over all classes, no task id. It *grows*: after task t only the classes of
  tasks 0…t are active (the others are masked out of the softmax, so they get no gradient and never win argmax).
- domain-incremental: one shared head with `classes_per_task` outputs and no task id (same labels in every task).
"""

from __future__ import annotations

import torch


class Scenario:
    name: str = ""

    def __init__(self, n_tasks: int, classes_per_task: int):
        self.n_tasks, self.classes_per_task = n_tasks, classes_per_task

    @property
    def n_outputs(self) -> int:
        return self.n_tasks * self.classes_per_task

    def train_view(self, logits, local_labels, task_ids, current_task: int):
        """(logits, targets) for the cross-entropy of a training batch while task `current_task` is trained."""
        raise NotImplementedError

    def eval_view(self, logits, local_labels, task_ids, trained_up_to: int):
        """(logits, targets) to score, after training tasks 0…trained_up_to (-1: the untrained model)."""
        raise NotImplementedError

    def logits_of_task(self, logits, task: int):
        """The outputs that belong to task `task` (what distillation of an old task keeps close)."""
        raise NotImplementedError


class TaskIncremental(Scenario):
    name = "task"

    def _own_head(self, logits, task_ids):
        blocks = logits.view(len(logits), self.n_tasks, self.classes_per_task)
        return blocks[torch.arange(len(logits), device=logits.device), task_ids]

    def train_view(self, logits, local_labels, task_ids, current_task):
        return self._own_head(logits, task_ids), local_labels

    def eval_view(self, logits, local_labels, task_ids, trained_up_to):
        return self._own_head(logits, task_ids), local_labels

    def logits_of_task(self, logits, task):
        return logits[:, task * self.classes_per_task : (task + 1) * self.classes_per_task]


class ClassIncremental(Scenario):
    """`train_classes`: the classes the cross-entropy covers while task t trains — `seen` (all classes of tasks
    0…t, van de Ven et al. 2022's "active classes") or `current` (only task t's classes, as in some LwF/iCaRL-style
    code; it removes the bias towards new classes from the softmax but cannot separate old from new)."""

    name = "class"

    def __init__(self, n_tasks: int, classes_per_task: int, train_classes: str = "seen"):
        super().__init__(n_tasks, classes_per_task)
        if train_classes not in ("seen", "current"):
            raise ValueError(f"scenario.train_classes: {train_classes!r} is not one of seen, current")
        self.train_classes = train_classes

    def active(self, trained_up_to: int) -> int:
        """Number of active outputs once tasks 0…trained_up_to are known (all of them for the untrained model)."""
        return self.n_outputs if trained_up_to < 0 else (trained_up_to + 1) * self.classes_per_task

    def train_view(self, logits, local_labels, task_ids, current_task):
        targets = task_ids * self.classes_per_task + local_labels
        if self.train_classes == "current":
            first = current_task * self.classes_per_task
            return logits[:, first : first + self.classes_per_task], targets - first
        return logits[:, : self.active(current_task)], targets

    def eval_view(self, logits, local_labels, task_ids, trained_up_to):
        return logits[:, : self.active(trained_up_to)], task_ids * self.classes_per_task + local_labels

    def logits_of_task(self, logits, task):
        return logits[:, task * self.classes_per_task : (task + 1) * self.classes_per_task]


class DomainIncremental(Scenario):
    name = "domain"

    @property
    def n_outputs(self) -> int:
        return self.classes_per_task

    def train_view(self, logits, local_labels, task_ids, current_task):
        return logits, local_labels

    def eval_view(self, logits, local_labels, task_ids, trained_up_to):
        return logits, local_labels

    def logits_of_task(self, logits, task):
        return logits
