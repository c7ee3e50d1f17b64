"""An iterable of whole batches cut from tensors: no Dataset, no per-sample Python, no worker processes.

Lightning accepts any sized iterable as a dataloader. Sharding for DDP is done here (so set
`use_distributed_sampler=False`): training shards are cut to equal length so that every rank runs the same number of
steps; evaluation shards are disjoint and cover every sample exactly once, so that summed metrics are exact.
"""

from __future__ import annotations

import math

import torch


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
    ):
        self.images, self.index, self.labels, self.task_ids = images, index, labels, task_ids
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # advanced at each pass, so that each epoch has its own reproducible order

    def _shard_size(self) -> int:
        n = len(self.index)
        if self.shuffle:  # training: equal shards, dropping at most world_size - 1 samples
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return math.ceil(self._shard_size() / self.batch_size)

    def __iter__(self):
        n = len(self.index)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator)[: self._shard_size() * self.world_size]
            self.epoch += 1
        else:
            order = torch.arange(n)
        order = order[self.rank :: self.world_size].to(self.index.device)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield self.images[self.index[rows]], self.labels[rows], self.task_ids[rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
