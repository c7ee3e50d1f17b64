"""The replay buffer every replay method shares: raw samples kept as tensors, filled one whole batch at a time.

What it holds: the uint8 images exactly as the DataModule keeps them (before augmentation and normalisation, so a
replayed sample is augmented afresh like a current one), their local labels and task ids, and optionally the
model's logits when they were stored (DER++). The tensors live on the device of the batches that fill it (the
training device); nothing is copied to the host per step.

Filling (`sampling`):
- `reservoir` (Vitter's Algorithm R): the i-th sample ever offered (from 0) goes to slot i while the buffer is not
  full; after that it draws j uniform in {0, …, i} and replaces slot j if j < capacity. Every sample seen so far is
  then held with probability capacity / seen. Vectorised per batch: one draw per sample of the batch, then the
  writes in arrival order with "last write wins" for slots drawn twice in one batch (a sort of at most batch-size
  writes, no Python loop per sample). The draws j_i do not depend on what the buffer holds, so this is exactly the
  sequential algorithm with the same draws (tested against a per-sample loop, and its inclusion probabilities with a
  chi-square test).
- `class_balanced`: one reservoir per class with an equal share of the buffer, capacity // n_classes slots each,
  over all classes of the sequence (classes are (task, local label) pairs, so domain-incremental tasks count
  separately). This is van de Ven et al.'s (2022) "N samples per class" memory: buffer_size = N × classes; early in
  the sequence the buffer is not full. Each class's reservoir is the one above, with per-class arrival counts.

Drawing: `sample(m)` draws m stored samples uniformly *with replacement*, so every step replays exactly m samples
(under DDP: equal chunks on every rank) and a draw costs O(m) whatever the buffer size.

DDP: the buffer is identical on every rank. Each rank gathers the step's samples from all ranks (`gather_batch`,
in rank order: the global batch) and adds the same global batch with the same generator; `sample` draws the same m
samples on every rank and returns the rank's contiguous chunk of them.

Random draws come from a CPU generator (reproducible on any device, moved to the device like the augmentation's);
`state_dict` holds the tensors, the counts and the generator state, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from src.continual.validate import ConfigError

SAMPLINGS = ("reservoir", "class_balanced")


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # queued without waiting (see src/data/augment.py)
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def last_write_wins(slots: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, source) pairs of the writes of sources `order` (0…n-1, the arrival order) to `slots` (-1: no write),
    keeping for every slot only its last write, as writing them one after the other would."""
    keep = slots >= 0
    n = len(keep)
    slots, order = slots[keep], order[keep]
    by_slot = torch.argsort(slots * n + order)
    slots, order = slots[by_slot], order[by_slot]
    last = torch.ones_like(slots, dtype=torch.bool)
    last[:-1] = slots[1:] != slots[:-1]
    return slots[last], order[last]


def reservoir_slots(arrival: torch.Tensor, capacity: int, draws: torch.Tensor) -> torch.Tensor:
    """Algorithm R's slot for the samples with 0-based arrival numbers `arrival` (-1: not stored), given one raw
    random integer per sample (`draws`, uniform on [0, 2^62)): j = draw mod (arrival + 1), with bias < 2^-40."""
    j = draws % (arrival + 1)
    return torch.where(arrival < capacity, arrival, torch.where(j < capacity, j, -1))


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors of every DDP rank concatenated in rank order (the global batch); themselves in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


class ReplayBuffer:
    def __init__(self, capacity: int, sampling: str = "reservoir", seed: int = 0):
        if not (isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 1):
            raise ConfigError(f"method.buffer_size={capacity!r} is invalid: an integer >= 1")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"method.sampling={sampling!r} is invalid: one of {', '.join(SAMPLINGS)}")
        self.capacity, self.sampling = capacity, sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = 0  # samples offered so far
        self.n_classes, self.classes_per_task = None, None  # class_balanced: set by `set_classes`
        self.seen_per_class: torch.Tensor | None = None
        self.images = self.labels = self.task_ids = self.logits = None

    # ---- what it holds ---------------------------------------------------------------------------------------------
    def set_classes(self, n_classes: int, classes_per_task: int) -> None:
        """class_balanced: the number of classes of the whole sequence and how local labels map onto them."""
        if self.sampling == "class_balanced" and self.capacity < n_classes:
            raise ConfigError(f"method.buffer_size={self.capacity} is invalid: class_balanced needs at least one slot "
                              f"per class ({n_classes} classes)")
        self.n_classes, self.classes_per_task = n_classes, classes_per_task

    @property
    def quota(self) -> int:
        return self.capacity // self.n_classes

    def filled_per_class(self) -> torch.Tensor:
        return self.seen_per_class.clamp(max=self.quota)

    def __len__(self) -> int:
        """Samples held (class_balanced: a device-to-host read; meant for tests and summaries, not every step)."""
        if self.images is None:
            return 0
        if self.sampling == "reservoir":
            return min(self.seen, self.capacity)
        return int(self.filled_per_class().sum())

    def contents(self) -> dict[str, torch.Tensor]:
        """The held samples (reservoir: slots 0…len-1; class_balanced: each class's filled slots), for tests."""
        if self.images is None:
            return {}
        if self.sampling == "reservoir":
            index = torch.arange(len(self), device=self.images.device)
        else:
            filled = self.filled_per_class()
            index = torch.cat([c * self.quota + torch.arange(int(f), device=filled.device)
                               for c, f in enumerate(filled.tolist())]).to(self.images.device)
        out = {"images": self.images[index], "labels": self.labels[index], "task_ids": self.task_ids[index]}
        if self.logits is not None:
            out["logits"] = self.logits[index]
        return out

    def _allocate(self, images, labels, logits) -> None:
        if self.images is not None:
            return
        device = images.device
        self.images = torch.zeros((self.capacity, *images.shape[1:]), dtype=images.dtype, device=device)
        self.labels = torch.zeros(self.capacity, dtype=labels.dtype, device=device)
        self.task_ids = torch.zeros(self.capacity, dtype=labels.dtype, device=device)
        if logits is not None:
            self.logits = torch.zeros((self.capacity, *logits.shape[1:]), dtype=logits.dtype, device=device)
        if self.sampling == "class_balanced":
            if self.n_classes is None:
                raise RuntimeError("ReplayBuffer(sampling=class_balanced) needs set_classes() before the first add")
            if self.seen_per_class is None:
                self.seen_per_class = torch.zeros(self.n_classes, dtype=torch.long, device=device)

    def to(self, device: torch.device) -> None:
        """Move the held tensors to `device` (after `load_state_dict`, which restores them on the CPU)."""
        if self.images is not None and self.images.device != device:
            for name in ("images", "labels", "task_ids", "logits", "seen_per_class"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).to(device))

    # ---- filling ---------------------------------------------------------------------------------------------------
    def add(self, images: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
            logits: torch.Tensor | None = None) -> None:
        """Offer a batch of samples (in arrival order); each is kept or not as the sampling rule says."""
        n = len(labels)
        if n == 0:
            return
        self._allocate(images, labels, logits)
        self.to(images.device)
        draws = torch.randint(0, 2**62, (n,), generator=self.generator)
        order = torch.arange(n)
        if self.sampling == "reservoir":  # arrival numbers are known on the host: no device round trip
            slots, source = last_write_wins(reservoir_slots(self.seen + order, self.capacity, draws), order)
            slots, source = _to(slots, images.device), _to(source, images.device)
        else:
            device = images.device
            keys = task_ids * self.classes_per_task + labels
            order = order.to(device)
            by_key = torch.argsort(keys * n + order)  # stable: each class's samples in arrival order
            sorted_keys = keys[by_key]
            rank_sorted = order - torch.searchsorted(sorted_keys, sorted_keys)  # position among its class's samples
            rank = torch.empty_like(rank_sorted)
            rank[by_key] = rank_sorted
            arrival = self.seen_per_class[keys] + rank
            local = reservoir_slots(arrival, self.quota, _to(draws, device))
            slots, source = last_write_wins(torch.where(local >= 0, keys * self.quota + local, -1), order)
            self.seen_per_class += torch.bincount(keys, minlength=self.n_classes)
        self.seen += n
        self.images.index_copy_(0, slots, images.index_select(0, source))
        self.labels.index_copy_(0, slots, labels.index_select(0, source))
        self.task_ids.index_copy_(0, slots, task_ids.index_select(0, source))
        if self.logits is not None and logits is not None:
            self.logits.index_copy_(0, slots, logits.detach().index_select(0, source).to(self.logits.dtype))

    # ---- drawing ---------------------------------------------------------------------------------------------------
    def sample(self, m: int, device: torch.device, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor] | None:
        """m stored samples drawn uniformly with replacement (None while the buffer is empty); under DDP the same m on
        every rank, of which this returns the rank's contiguous chunk (m must be a multiple of world_size)."""
        if self.seen == 0 or self.images is None:
            return None
        self.to(device)
        if self.sampling == "reservoir":
            index = _to(torch.randint(0, min(self.seen, self.capacity), (m,), generator=self.generator), device)
        else:
            u = _to(torch.rand(m, generator=self.generator, dtype=torch.float64), device)
            filled = self.filled_per_class()
            ends = filled.cumsum(0)
            r = (u * ends[-1]).long().clamp(max=ends[-1] - 1)  # the r-th held sample, classes in order
            cls = torch.searchsorted(ends, r, right=True)
            index = cls * self.quota + (r - (ends[cls] - filled[cls]))
        chunk = index[rank * m // world_size : (rank + 1) * m // world_size]
        out = {"images": self.images[chunk], "labels": self.labels[chunk], "task_ids": self.task_ids[chunk]}
        if self.logits is not None:
            out["logits"] = self.logits[chunk]
        return out

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {"capacity": self.capacity, "sampling": self.sampling, "seen": self.seen,
                "seen_per_class": cpu(self.seen_per_class), "images": cpu(self.images), "labels": cpu(self.labels),
                "task_ids": cpu(self.task_ids), "logits": cpu(self.logits), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("capacity", "sampling"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"method.{'buffer_size' if key == 'capacity' else key}={getattr(self, key)!r} but "
                                  f"the checkpoint's buffer was made with {state[key]!r}")
        self.seen = int(state["seen"])
        for name in ("seen_per_class", "images", "labels", "task_ids", "logits"):
            setattr(self, name, state[name])
        self.generator.set_state(state["generator"])
