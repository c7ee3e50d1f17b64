"""How a labelled dataset becomes a sequence of tasks.

A task is a set of sample indices into the source's tensors plus each sample's *local* label (0…classes_per_task-1).
The scenario (task-, domain- or class-incremental) later decides which label the model is trained on; the global
label of a sample is always `task * classes_per_task + local_label`.

Two kinds of construction:
- `ClassSplit` gives each task its own classes (Split MNIST, Split CIFAR): a natural fit for task- and
  class-incremental learning.
- `Permutations` and `Rotations` give every task *all* images with their own labels and change the input instead
  (a fixed pixel permutation or rotation per task, applied to whole batches on the training device): the same
  labels in every task, so domain-incremental learning is their natural scenario; task- and class-incremental
  still work (global label = task × n_classes + label).

Every construction implements `build(...)` (indices and local labels per task), `batch_transform(x, task_ids)`
(applied per batch after normalisation; `task_ids` is per sample, so a joint batch may mix tasks) and `describe()`
(what defines the tasks — class order, permutations, angles — as a JSON-ready dict for results.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    transforms_inputs = False  # the images as they are

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
        self.built_order = order
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

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        """What defines the tasks, for results.json: the class order actually used (known after `build`)."""
        return {
            "type": "ClassSplit", "n_tasks": self.n_tasks, "classes_per_task": self.classes_per_task,
            "class_order": getattr(self, "built_order", self.class_order), "shuffle_seed": self.shuffle_seed,
        }


class SameClassesEveryTask:
    """Base of the domain-incremental constructions: every task holds every image, with the source's labels.

    Validation samples are held out of every class of the training set, once, and are the same in every task.
    """

    kind = ""
    transforms_inputs = True  # `batch_transform` changes the images (the DataModule may cache a task's result)

    def __init__(self, n_tasks: int, seed: int | None = None):
        if n_tasks < 1:
            raise DatasetError(f"dataset.tasks.n_tasks={n_tasks} is invalid: an integer >= 1")
        self.n_tasks, self.seed = n_tasks, seed
        self.classes_per_task: int | None = None  # set by build(): every class of the source
        self.used_seed: int | None = None  # `seed`, or the run's seed when `seed` is null

    def build(self, train_y, test_y, n_classes, val_fraction, seed) -> list[Task]:
        self.classes_per_task = n_classes
        self.used_seed = int(self.seed if self.seed is not None else seed)
        train_idx, val_idx = stratified_split(train_y, val_fraction, seed)
        test_idx = torch.arange(len(test_y))
        classes = list(range(n_classes))
        return [
            Task(classes, train_idx, train_y[train_idx], val_idx, train_y[val_idx], test_idx, test_y[test_idx])
            for _ in range(self.n_tasks)
        ]

    def _seed(self) -> int:
        if self.used_seed is None:
            raise RuntimeError(f"{type(self).__name__}.build() must run before its transforms are used")
        return self.used_seed


class Permutations(SameClassesEveryTask):
    """Permuted MNIST (Goodfellow et al. 2013; Kirkpatrick et al. 2017): a fixed pixel permutation per task.

    The permutations are drawn from `seed` (null: the run's seed) with one generator, task after task, so task t's
    permutation depends only on the seed, t and `first_task_identity` (True: task 0 sees the original images, as
    in some papers; the draws then start at task 1). All channels share a pixel's permutation.
    """

    kind = "permutations"

    def __init__(self, n_tasks: int = 10, seed: int | None = None, first_task_identity: bool = False):
        super().__init__(n_tasks, seed)
        self.first_task_identity = first_task_identity
        self._tables: dict = {}

    def permutations(self, n_pixels: int) -> torch.Tensor:
        """(n_tasks, n_pixels) int64: row t lists, for each output pixel, the input pixel it shows."""
        key = (n_pixels, "cpu")
        if key not in self._tables:
            generator = torch.Generator().manual_seed(self._seed())
            rows = [
                torch.arange(n_pixels) if t == 0 and self.first_task_identity
                else torch.randperm(n_pixels, generator=generator)
                for t in range(self.n_tasks)
            ]
            self._tables[key] = torch.stack(rows)
        return self._tables[key]

    def _table(self, n_pixels: int, device) -> torch.Tensor:
        key = (n_pixels, str(device))
        if key not in self._tables:
            self._tables[key] = self.permutations(n_pixels).to(device)
        return self._tables[key]

    def batch_transform(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        index = self._table(h * w, x.device)[task_ids]  # one gather for the whole batch, tasks mixed or not
        return x.reshape(n, c, h * w).gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        """The permutations themselves need the image size: pass the input shape (C, H, W)."""
        n_pixels = math.prod(input_shape[-2:]) if input_shape is not None else None
        return {
            "type": "Permutations", "n_tasks": self.n_tasks, "seed": self.used_seed,
            "first_task_identity": self.first_task_identity,
            "permutations": self.permutations(n_pixels).tolist() if n_pixels and self.used_seed is not None else None,
        }


class Rotations(SameClassesEveryTask):
    """Rotated MNIST (Lopez-Paz & Ranzato 2017): the images of task t are rotated by a fixed angle (degrees,
    counter-clockwise as displayed).

    Angles: `angles` lists them explicitly; else `random: true` draws them uniformly from [0, max_angle) with `seed`
    (null: the run's seed), as Lopez-Paz & Ranzato did; else they are evenly spaced from 0 to `max_angle` inclusive
    (10 tasks, 180°: 0, 20, …, 180). Rotation is one batched `affine_grid` + `grid_sample` on the training device;
    corners uncovered by the rotated image take the image's darkest value per channel (the black background of the
    MNIST family).
    """

    kind = "rotations"

    def __init__(
        self,
        n_tasks: int = 10,
        angles: list[float] | None = None,
        max_angle: float = 180.0,
        random: bool = False,
        seed: int | None = None,
        interpolation: str = "bilinear",
    ):
        super().__init__(n_tasks, seed)
        if angles is not None and len(angles) != n_tasks:
            raise DatasetError(f"dataset.tasks.angles: {len(angles)} angles for n_tasks={n_tasks} tasks")
        if interpolation not in ("bilinear", "nearest"):
            raise DatasetError(f"dataset.tasks.interpolation={interpolation!r} is invalid: bilinear or nearest")
        self.angles_given, self.max_angle, self.random = angles, float(max_angle), random
        self.interpolation = interpolation
        self._radians: dict = {}

    def angles(self) -> list[float]:
        """The angle of every task, in degrees."""
        if self.angles_given is not None:
            return [float(a) for a in self.angles_given]
        if self.random:
            generator = torch.Generator().manual_seed(self._seed())
            return (torch.rand(self.n_tasks, generator=generator, dtype=torch.float64) * self.max_angle).tolist()
        if self.n_tasks == 1:
            return [0.0]
        return [self.max_angle * t / (self.n_tasks - 1) for t in range(self.n_tasks)]

    def batch_transform(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self._radians:
            self._radians[key] = torch.deg2rad(torch.tensor(self.angles(), dtype=torch.float64)).float().to(x.device)
        angle = self._radians[key][task_ids]
        n, _, h, w = x.shape
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        # output → input sampling grid, in coordinates normalised to [-1, 1] per axis (hence the aspect ratios)
        theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
        fill = x.amin(dim=(2, 3), keepdim=True)
        out = F.grid_sample(x - fill, grid, mode=self.interpolation, padding_mode="zeros", align_corners=False) + fill
        return torch.where((angle == 0).view(n, 1, 1, 1), x, out)

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        resolved = self.angles_given is not None or not self.random or self.used_seed is not None
        return {
            "type": "Rotations", "n_tasks": self.n_tasks, "seed": self.used_seed, "random": self.random,
            "max_angle": self.max_angle, "interpolation": self.interpolation,
            "angles": self.angles() if resolved else None,
        }
