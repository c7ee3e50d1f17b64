"""The DDP batch rule: `dataset.batch_size` is the GLOBAL batch, so a run is the same run on any number of processes.

At optimizer step s the single-process batch B_s (same order function of (seed, task, step)) is cut into W contiguous
parts and rank r takes part r: rows [g·r // W, g·(r+1) // W) of the g = |B_s| rows. The ranks' parts concatenated in
rank order are exactly B_s. A full batch (g = batch_size) has equal parts because batch_size must be a multiple of
W (refused otherwise, before training). The last batch of a pass (g = n mod batch_size) may not be divisible by W:
its parts then differ by one row, and each rank's loss is weighted by w_r = W·|part r| / g (`src/data/loss_weights.py`),
so that DDP's average of the ranks' gradients is the gradient of the mean over the global batch:

    (1/W) Σ_r w_r ∇ mean_{i ∈ part r} ℓ_i = (1/g) Σ_i ∇ℓ_i,      and, for a term c the same on every rank
    (EWC's penalty), (1/W) Σ_r w_r ∇c = ∇c (Σ_r |part r| = g).

Augmentation draws are made for the g rows of the global batch and each rank applies the draws of its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from src.continual.validate import ConfigError


@dataclass(frozen=True)
class StepLayout:
    """Where one rank's part of one training step sits in the global batch."""

    global_size: int  # rows of the single-process batch of this step
    start: int  # this rank's rows of it: [start, stop)
    stop: int
    world_size: int = 1

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def loss_weight(self) -> float:
        """W·|part| / g: 1 for equal parts (every full batch); makes DDP's gradient average the global mean."""
        return self.world_size * self.rows / self.global_size


def batch_sizes_of_pass(n: int, batch_size: int) -> list[int]:
    """The single-process batch sizes of a pass over n samples: full batches, then the rest (if any)."""
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def step_layouts(n: int, batch_size: int, rank: int, world_size: int) -> list[StepLayout]:
    """This rank's part of every step of a pass over n samples."""
    check_global_batch(batch_size, world_size, {"the training set": n})
    return [StepLayout(g, g * rank // world_size, g * (rank + 1) // world_size, world_size)
            for g in batch_sizes_of_pass(n, batch_size)]


def rank_positions(n: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Positions (into the pass's order) of this rank's samples, step after step."""
    if world_size == 1:
        return torch.arange(n)
    parts = [torch.arange(step * batch_size + layout.start, step * batch_size + layout.stop)
             for step, layout in enumerate(step_layouts(n, batch_size, rank, world_size))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def world_size_of(trainer_cfg) -> int | None:
    """Processes a trainer config starts (devices × num_nodes under a DDP strategy); None when not known from the
    config alone (devices: auto, -1 or a list)."""
    strategy = trainer_cfg.get("strategy", None)
    name = strategy if isinstance(strategy, str) else str((strategy or {}).get("_target_", ""))
    if "ddp" not in name.lower():
        return 1
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def check_global_batch(batch_size: int, world_size: int, pass_sizes: dict[str, int] | None = None) -> None:
    """Refuse, in one line, a global batch that W processes cannot share: batch_size must be a multiple of W, and the
    last batch of every pass must have at least one sample per process (a process with no sample has no loss)."""
    if world_size <= 1:
        return
    if batch_size % world_size:
        low, high = batch_size // world_size * world_size, math.ceil(batch_size / world_size) * world_size
        allowed = ", ".join(str(v) for v in (low, high) if v > 0)
        raise ConfigError(
            f"dataset.batch_size={batch_size} is invalid: it is the global batch, cut into equal parts for the "
            f"{world_size} processes, so it must be a multiple of {world_size} (e.g. {allowed})")
    for what, n in (pass_sizes or {}).items():
        rest = n % batch_size
        if 0 < rest < world_size:
            raise ConfigError(
                f"dataset.batch_size={batch_size} is invalid with {world_size} processes: the last batch of a pass "
                f"over {what} ({n} samples) has {rest} sample(s), fewer than one per process; choose a batch size "
                f"for which {n} mod batch_size is 0 or at least {world_size}")
