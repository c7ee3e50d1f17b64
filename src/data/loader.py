"""An iterable of whole batches cut from tensors: no Dataset, no per-sample Python, no worker processes.

Lightning accepts any sized iterable as a dataloader. Sharding for DDP is done here (so set
`use_distributed_sampler=False`):
- training: `batch_size` is the GLOBAL batch. The order and the batches are those of one process; with W processes
  each batch is cut into W contiguous parts and rank r takes part r (`src/data/global_batch.py`), so the ranks' parts
  of step s, concatenated in rank order, are exactly the single-process batch s, and every rank runs the same steps;
- evaluation: shards are disjoint and cover every sample exactly once (`order[rank::world]`), so summed metrics are
  exact.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from src.data.global_batch import StepLayout, rank_positions, step_layouts


class TensorBatchLoader:
    def __init__(
        self,
        images: torch.Tensor,
        index: torch.Tensor,
        labels: torch.Tensor,
        task_ids: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        position_source=None,
        steps_per_batch: int = 1,
        budget_source=None,
    ):
        self.images, self.index, self.labels, self.task_ids = images, index, labels, task_ids
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        # Training order is one endless stream of reproducible permutations, a pure function of the seed: the
        # batch at position k is batch k % len of permutation k // len. `position_source()` tells where the next
        # pass starts (the task loop derives it from the optimizer steps done in the task); without it each pass
        # starts a new permutation. Neither depends on Lightning's epoch counter, iterators it creates and drops,
        # or whether the run was resumed from a checkpoint in the middle of an epoch.
        self.position_source, self.passes = position_source, 0
        # Training with steps_per_batch = K > 1: each item is a superbatch, the images of up to K consecutive steps
        # in one gather (the DataModule splits it back into steps of `batch_size`). Groups are K-aligned within a
        # pass, never cross the end of a pass, and never exceed `budget_source()` (the optimizer steps the trainer
        # may still take in this task; None: no limit), so the positions above stay counted in optimizer steps.
        self.steps_per_batch, self.budget_source = steps_per_batch, budget_source
        # Training: the layout (global batch size, this rank's rows) of each step of every item yielded and not yet
        # prepared, oldest first; the DataModule takes them in order (Lightning fetches one item ahead).
        self.layouts: deque[list[StepLayout]] = deque()
        # Training: the source rows of every item yielded and not yet prepared, oldest first, when asked for (the
        # DataModule then takes its task's transformed images from its cache instead of transforming the batch)
        self.record_rows = False
        self.rows: deque[torch.Tensor] = deque()

    def _shard_size(self) -> int:
        n = len(self.index)
        if self.shuffle:  # training: the whole pass, whatever the number of processes (global batches)
            return n
        return len(range(self.rank, n, self.world_size))

    def steps_per_pass(self) -> int:
        return math.ceil(self._shard_size() / self.batch_size)

    def rank_batch_size(self) -> int:
        """Samples of a full training batch on this rank: batch_size / world_size (validated to divide)."""
        return self.batch_size // self.world_size

    def __len__(self) -> int:
        """Items per pass: steps, or superbatches of up to `steps_per_batch` steps when training with K > 1."""
        steps = self.steps_per_pass()
        return math.ceil(steps / self.steps_per_batch) if self.shuffle else steps

    def __iter__(self):
        n = len(self.index)
        skip = 0
        if self.shuffle:
            steps = self.steps_per_pass()
            position = self.position_source() if self.position_source is not None else self.passes * steps
            permutation, skip = divmod(position, steps)
            self.passes = permutation + 1
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + permutation)
            order = torch.randperm(n, generator=generator)
            # this rank's part of every global batch of the pass, in step order (all of it with one process)
            order = order[rank_positions(n, self.batch_size, self.rank, self.world_size)]
        else:
            order = torch.arange(n)[self.rank :: self.world_size]
        order = order.to(self.index.device)
        # one gather per pass for the index, labels and task ids, so that a batch costs one gather (of its images)
        # and two views: on a GPU every small op is a kernel launch, on a CPU a wake-up of the thread pool
        index, labels, task_ids = self.index[order], self.labels[order], self.task_ids[order]
        if not self.shuffle:
            for start in range(0, len(order), self.batch_size):
                stop = start + self.batch_size
                yield self.images.index_select(0, index[start:stop]), labels[start:stop], task_ids[start:stop]
            return
        self.layouts.clear()
        self.rows.clear()
        layouts = step_layouts(n, self.batch_size, self.rank, self.world_size)
        if self.steps_per_batch > 1:
            yield from self._superbatches(index, labels, task_ids, skip, layouts)
            return
        bs = self.rank_batch_size()  # every rank's part of step j starts at j × bs (only the pass's last is shorter)
        for step in range(skip, len(layouts)):
            start = step * bs
            stop = start + layouts[step].rows
            self.layouts.append([layouts[step]])
            if self.record_rows:
                self.rows.append(index[start:stop])
            yield self.images.index_select(0, index[start:stop]), labels[start:stop], task_ids[start:stop]

    def _superbatches(self, index, labels, task_ids, skip: int, layouts: list[StepLayout]):
        k, bs, n, steps = self.steps_per_batch, self.rank_batch_size(), len(index), self.steps_per_pass()
        budget = self.budget_source() if self.budget_source is not None else None
        step = skip
        while step < steps:
            end = min((step // k + 1) * k, steps)
            if budget is not None and budget > 0:  # the task's last superbatch ends exactly at its last step
                end = min(end, step + budget)
                budget -= end - step
            start, stop = step * bs, min(end * bs, n)
            self.layouts.append(layouts[step:end])
            if self.record_rows:
                self.rows.append(index[start:stop])
            yield self.images.index_select(0, index[start:stop]), labels[start:stop], task_ids[start:stop]
            step = end
