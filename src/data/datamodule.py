"""The task-sequence DataModule: one task at a time for training, every task for evaluation.

Images stay uint8 tensors in memory (optionally on the training device) and are normalised per batch after they
reach the device. Batches are `(x, local_label, task_id)`; the scenario maps local labels to the model's targets.
"""

from __future__ import annotations

from collections import deque

import lightning as L
import torch

from src.data.global_batch import StepLayout, batch_sizes_of_pass, check_global_batch
from src.data.loader import TensorBatchLoader
from src.data.loss_weights import GlobalBatchLossWeights
from src.data.source import ImageData


class TrainingBatch(tuple):
    """A prepared training batch `(x, local_label, task_id)` that also carries what it was prepared from: `raw`, the
    uint8 batch before augmentation and normalisation (what a replay buffer stores), and `step`, the trainer's global
    step it is trained at. It unpacks like any batch; only methods that store samples look at the two attributes."""

    def __new__(cls, prepared, raw, step: int):
        batch = super().__new__(cls, prepared)
        batch.raw, batch.step = raw, step
        return batch


class TaskSequenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        source,
        tasks,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        seed: int = 0,
        data_on_device: bool | str = "auto",
        augment=None,
        eval_max_samples: int | None = None,
        task_pass_max_samples: int | None = None,
        cache_task_transform: bool = True,
    ):
        super().__init__()
        if data_on_device not in (True, False, "auto"):
            raise ValueError(f"dataset.data_on_device={data_on_device!r} is invalid: one of auto, true, false")
        if not isinstance(cache_task_transform, bool):
            from src.continual.validate import ConfigError

            raise ConfigError(f"dataset.cache_task_transform={cache_task_transform!r} is invalid: true or false")
        # permuted/rotated tasks: transform the training task's images once when it starts, not every batch
        self.cache_task_transform = cache_task_transform
        self._transform_cache = None  # ((task, device), slot, images): see _task_cache
        self.source, self.tasks = source, tasks
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.seed, self.data_on_device = val_fraction, seed, data_on_device
        self.augment = augment  # e.g. src.data.augment.RandomCropFlip: uint8 batches, training only
        for key, value in (("eval_max_samples", eval_max_samples), ("task_pass_max_samples", task_pass_max_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                from src.continual.validate import ConfigError

                raise ConfigError(f"dataset.{key}={value!r} is invalid: null (all) or an integer >= 1")
        # debug=fast: evaluate on a subsample of every task, and cap the methods' own passes over a task's data
        self.eval_max_samples, self.task_pass_max_samples = eval_max_samples, task_pass_max_samples
        self.data: ImageData | None = None
        self.task_list = []
        self.current_task = 0
        self.train_tasks: list[int] = [0]
        self.task_start_step = 0  # the trainer's global step when the current task started (set by the task loop)
        # K > 1: training batches are superbatches of up to K optimizer steps (set from the top-level
        # `steps_per_batch` by build_task_loop); after the transfer they are lists of the steps' batches
        self.steps_per_batch = 1
        self.eval_split = "test"  # what `test_dataloader` serves: "test", or "val" (carved from train)
        self.eval_tasks: list[int] | None = None  # the tasks `test_dataloader` serves, in order (None: all)
        self._norm_cache: dict = {}
        # DDP (src/data/global_batch.py): `batch_size` is the global batch. The loss weights of the training steps
        # prepared but not yet back-propagated (taken by GlobalBatchLossWeights)
        self._train_loader: TensorBatchLoader | None = None
        self._loss_weights: deque[float] = deque()

    # ---- loading -------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per machine before the others set up, so a download happens once."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; Lightning calls this at every fit/test, so it must be idempotent."""
        if self.data is None:
            self.data = self.source.load()
            self.task_list = self.tasks.build(
                self.data.train_y, self.data.test_y, self.data.n_classes, self.val_fraction, self.seed
            )
        self._check_and_weight_global_batches()
        strategy = getattr(self.trainer, "strategy", None)
        if self.data_on_device and strategy is not None and self._keep_on_device(strategy.root_device):
            device = strategy.root_device
            self.data.train_x, self.data.test_x = self.data.train_x.to(device), self.data.test_x.to(device)

    def _check_and_weight_global_batches(self) -> None:
        """Under DDP, before anything trains: refuse a global batch the processes cannot share (one line), and add
        the callback that weights uneven last parts of a pass."""
        world = self.world_size()
        if world <= 1:
            return
        module = getattr(self.trainer, "lightning_module", None)
        joint = bool(getattr(getattr(module, "regularizer", None), "trains_on_past_tasks", False))
        sizes = {}
        for t, task in enumerate(self.task_list):
            served = self.task_list[: t + 1] if joint else [task]
            sizes[f"task {t}'s training set" + (" and the tasks before it" if joint and t else "")] = sum(
                len(p.train_index) for p in served)
        check_global_batch(self.batch_size, world, sizes)
        if not any(isinstance(c, GlobalBatchLossWeights) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(GlobalBatchLossWeights(self))

    def world_size(self) -> int:
        """Processes sharing every global batch (1 without DDP)."""
        return self._rank_world()[1]

    def rank_batch_size(self) -> int:
        """Rows of a full training batch on this process: batch_size / world_size (the last of a pass may have
        fewer)."""
        return self.batch_size // self.world_size()

    def rank_rows(self, global_size: int) -> tuple[int, int]:
        """This process's rows [start, stop) of a global batch of `global_size` rows, by the rule training batches are
        cut with (e.g. for a method's own replay batch: draw it for the global batch, keep these rows)."""
        rank, world = self._rank_world()
        return global_size * rank // world, global_size * (rank + 1) // world

    def next_loss_weight(self) -> float:
        """The loss weight of the oldest prepared training step not yet back-propagated (1 when none is known)."""
        return self._loss_weights.popleft() if self._loss_weights else 1.0

    def _keep_on_device(self, device: torch.device) -> bool:
        """`data_on_device`: "auto" keeps the uint8 images on an accelerator (a GPU holds CIFAR-100 in 180 MB and then
        never waits for host-to-device copies); on a CPU there is nothing to move."""
        if self.data_on_device == "auto":
            return device.type != "cpu"
        return bool(self.data_on_device)

    @property
    def n_tasks(self) -> int:
        return self.tasks.n_tasks

    @property
    def classes_per_task(self) -> int:
        return self.tasks.classes_per_task

    @property
    def input_shape(self) -> tuple[int, ...]:
        self.setup()
        return self.data.input_shape

    def task_classes(self) -> list[list[int]]:
        """The source class ids of each task, in local-label order (written to results.json)."""
        self.setup()
        return [task.classes for task in self.task_list]

    # ---- which task is served ------------------------------------------------------------------------------------
    def set_task(self, task: int, include_past: bool = False) -> None:
        """Serve task `task` for training; with `include_past`, the union of tasks 0…task (the joint baseline)."""
        self.current_task = task
        self.train_tasks = list(range(task + 1)) if include_past else [task]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, split: str, task_ids: list[int], batch_size: int, shuffle: bool, seed: int = 0):
        self.setup()
        images = self.data.test_x if split == "test" else self.data.train_x
        parts = [self.task_list[t] for t in task_ids]
        index = torch.cat([getattr(p, f"{split}_index") for p in parts])
        labels = torch.cat([getattr(p, f"{split}_label") for p in parts])
        tasks = torch.cat([torch.full((len(getattr(p, f"{split}_index")),), t) for t, p in zip(task_ids, parts, strict=True)])
        rank, world = self._rank_world()
        device = images.device
        return TensorBatchLoader(
            images, index.to(device), labels.to(device), tasks.to(device), batch_size, shuffle, seed, rank, world
        )

    def train_dataloader(self):
        loader = self._loader(
            "train", self.train_tasks, self.batch_size, shuffle=True, seed=self.seed * 1000 + self.current_task
        )
        trainer = self.trainer
        if trainer is not None:  # the next batch follows from the optimizer steps done in this task
            start = self.task_start_step
            loader.position_source = lambda: (trainer.global_step - start) * trainer.accumulate_grad_batches
            if self.steps_per_batch > 1:
                loader.steps_per_batch = self.steps_per_batch
                loader.budget_source = lambda: _steps_left(trainer)
        loader.record_rows = self._caches_transform()
        self._train_loader = loader
        self._loss_weights.clear()
        return loader

    def test_dataloader(self):
        return self.eval_dataloaders(self.eval_split)

    def eval_dataloaders(self, split: str = "test") -> list[TensorBatchLoader]:
        """One loader per task (seen or not; `eval_tasks`: those only), in task order; `split` is "test" or "val".

        With `eval_max_samples` = N, each task's N samples at evenly spaced positions of its split (a task's samples
        are stored class by class, so its first N would be one class): the same samples at every evaluation."""
        tasks = range(self.n_tasks) if self.eval_tasks is None else self.eval_tasks
        loaders = [self._loader(split, [t], self.eval_batch_size, shuffle=False) for t in tasks]
        for loader in loaders:
            n = len(loader.index)
            if self.eval_max_samples is not None and n > self.eval_max_samples:
                keep = (torch.arange(self.eval_max_samples) * n // self.eval_max_samples).to(loader.index.device)
                loader.index, loader.labels, loader.task_ids = loader.index[keep], loader.labels[keep], loader.task_ids[keep]
        return loaders

    def task_batches(self, task: int, split: str = "train", batch_size: int | None = None, device=None,
                     max_samples: int | None = None):
        """Normalised batches of one task on `device`, outside Lightning's loops (e.g. for a Fisher estimate).

        In order (no shuffling), at most `max_samples` samples (the first ones of this task), and sharded over DDP
        ranks like evaluation: each rank sees a disjoint part and together they see each sample once.
        `task_pass_max_samples` (debug=fast) caps `max_samples`.
        """
        if self.task_pass_max_samples is not None:
            max_samples = min(max_samples or self.task_pass_max_samples, self.task_pass_max_samples)
        loader = self._loader(split, [task], batch_size or self.eval_batch_size, shuffle=False)
        if max_samples is not None:
            loader.index, loader.labels, loader.task_ids = (
                loader.index[:max_samples], loader.labels[:max_samples], loader.task_ids[:max_samples]
            )
        for batch in loader:
            if device is not None:
                batch = tuple(b.to(device, non_blocking=True) for b in batch)
            yield self.on_after_batch_transfer(batch, 0)

    def has_validation(self) -> bool:
        self.setup()
        return all(len(task.val_index) > 0 for task in self.task_list)

    # ---- on the device -------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 → normalised float in one fused pass on the training device, then the task's own transform.

        A training superbatch (steps_per_batch > 1) becomes the list of its steps' batches, each this process's part of
        its step's global batch (batch_size / W rows; the last of a pass may have fewer), prepared exactly as it would
        be on its own at its step. Under DDP the augmentation draws are those of the global batch (each process
        applies its rows'), and each step's loss weight is queued for GlobalBatchLossWeights (1 for equal parts)."""
        training = self.trainer is not None and self.trainer.training
        if not training:
            return self._prepare(batch, None)
        layouts = self._layouts_of(batch)
        # the loss weights of the steps of this batch, in the order they are back-propagated (1 for equal parts)
        self._loss_weights = deque(layout.loss_weight for layout in layouts)
        step = self.trainer.global_step
        rows = self._rows_of(batch)
        if self.steps_per_batch > 1:
            sizes = [layout.rows for layout in layouts]
            parts = rows.split(sizes) if rows is not None else [None] * len(sizes)
            return [self._prepare(part, step + i, layout, rows=part_rows) for i, (part, layout, part_rows) in
                    enumerate(zip(zip(*(b.split(sizes) for b in batch), strict=True), layouts, parts, strict=True))]
        return self._prepare(batch, step, layouts[0], rows=rows)

    def _rows_of(self, batch) -> torch.Tensor | None:
        """The source rows of a training batch when the loader records them (the task's transform is cached)."""
        loader = self._train_loader
        if loader is not None and loader.record_rows and loader.rows:
            return loader.rows.popleft()
        return None

    # ---- the training task's transformed images, once per task ----------------------------------------------------
    def _caches_transform(self) -> bool:
        """Cache when the task transforms its inputs (permuted, rotated), batches hold one task, nothing random
        comes before the transform (augmentation draws differ every step), and the task trains on at least as many
        images as it has (a task of a few steps, e.g. `trainer.max_steps=20`, transforms fewer per batch)."""
        if not (self.cache_task_transform and self.augment is None and len(self.train_tasks) == 1
                and getattr(self.tasks, "transforms_inputs", False)):
            return False
        steps = _steps_left(self.trainer) if self.trainer is not None else None
        return steps is None or steps * self.batch_size >= len(self.task_list[self.current_task].train_index)

    def _task_cache(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, images): the training task's images normalised and transformed once, as float on `device`, and for
        every row of the source's training images its position there (-1: not in the task).

        A rotation per batch (affine_grid + grid_sample) cost more than the MLP's step (issue 15). Each image's
        result does not depend on the batch it is in (per-sample normalisation, gather, grid and fill), so batches
        cut from the cache are bit-identical to batches transformed one by one (tests/test_transform_cache.py).
        Memory: one task's training images as float (Fashion-MNIST: 54,000 × 784 × 4 B = 169 MB), built at the
        task's first batch, freed when the next task's is built; evaluation, the methods' passes (Fisher) and
        replayed samples of earlier tasks are transformed per batch as before."""
        key = (self.current_task, str(device))
        if self._transform_cache is not None and self._transform_cache[0] == key:
            return self._transform_cache[1], self._transform_cache[2]
        self._transform_cache = None  # the previous task's is freed before this one's is built
        images = self.data.train_x
        index = self.task_list[self.current_task].train_index.to(images.device)
        slot = torch.full((len(images),), -1, dtype=torch.long, device=images.device)
        slot[index] = torch.arange(len(index), device=images.device)
        cache = None
        for start in range(0, len(index), self.eval_batch_size):
            rows = index[start : start + self.eval_batch_size]
            x = images.index_select(0, rows).to(device)
            task_ids = torch.full((len(rows),), self.current_task, dtype=torch.long, device=device)
            out = self._prepare((x, None, task_ids), None)[0]
            if cache is None:
                cache = torch.empty((len(index), *out.shape[1:]), dtype=out.dtype, device=device)
            cache[start : start + len(rows)] = out
        self._transform_cache = (key, slot, cache)
        return slot, cache

    def _layouts_of(self, batch) -> list[StepLayout]:
        """The layouts of the steps of a training batch, as the loader yielded them (it is one item ahead of us);
        without them (a batch not from our loader), whole single-process batches of `batch_size`."""
        loader = self._train_loader
        if loader is not None and loader.layouts:
            return loader.layouts.popleft()
        return [StepLayout(g, 0, g) for g in batch_sizes_of_pass(len(batch[1]), self.batch_size)]

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of x/255: the dataset's, or (0, 1) when the backbone normalises its inputs itself
        (`normalizes_inputs`: a pretrained timm backbone, which applies its pretraining's statistics; docs/pretrained.md)."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if getattr(getattr(module, "backbone", None), "normalizes_inputs", False):
            return (0.0,) * len(self.data.mean), (1.0,) * len(self.data.std)
        return self.data.mean, self.data.std

    def prepare_replayed(self, batch, global_step: int, layout: StepLayout | None = None):
        """Stored raw uint8 samples `(x, local_label, task_id)` prepared as a training batch of step `global_step` is:
        the same augmentation (its own draws, seeded from (seed, task, step) apart from the current batch's, so the
        current batch is augmented as without replay), normalisation and each sample's own task transform."""
        return self._prepare(batch, global_step, layout, stream=1)

    def _prepare(self, batch, global_step: int | None, layout: StepLayout | None = None, stream: int = 0,
                 rows: torch.Tensor | None = None):
        raw = batch
        x, y, task_ids = batch
        if rows is not None:  # the current task's images, transformed once when it started (_task_cache)
            slot, cache = self._task_cache(x.device)
            position = slot[rows].to(cache.device)
            return TrainingBatch((cache.index_select(0, position), y, task_ids), raw, global_step)
        if self.augment is not None and global_step is not None:
            # the draws of a training step depend only on (seed, task, step in the task), as the batch order does;
            # under DDP they are the draws of the whole global batch, of which this rank applies its rows'
            step = global_step - self.task_start_step
            key = (self.augment.seed, self.current_task, step) + ((stream,) if stream else ())
            self.augment.reseed(hash(key) % 2**62)
            if layout is None or (layout.start, layout.stop) == (0, layout.global_size):
                x = self.augment(x)
            else:
                x = self.augment(x, rows=(layout.start, layout.stop), total=layout.global_size)
        key = (x.device, x.shape[1])
        if key not in self._norm_cache:
            mean, std = self.normalization()
            std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
            mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
            self._norm_cache[key] = (1.0 / (255.0 * std), -mean / std)
        scale, shift = self._norm_cache[key]
        x = torch.addcmul(shift, x.float(), scale)
        prepared = (self.tasks.batch_transform(x, task_ids), y, task_ids)
        return prepared if global_step is None or stream else TrainingBatch(prepared, raw, global_step)


def _steps_left(trainer) -> int | None:
    """Optimizer steps the trainer may still take in this fit (None: limited by epochs only)."""
    max_steps = trainer.fit_loop.epoch_loop.max_steps
    return max_steps - trainer.global_step if max_steps is not None and max_steps >= 0 else None
