"""Experience replay (ER; e.g. Chaudhry et al. 2019, Mammoth's `er`): every step trains on the current batch plus a
batch drawn from a buffer of past samples, in ONE forward, with the scenario's cross-entropy over both.

- The buffer (`src/methods/replay_buffer.py`) holds raw uint8 samples with their local label and task id; it is
  filled by `sampling` (`reservoir`, or `class_balanced`: an equal share per class) with every training batch the
  step has trained on, after the replayed batch was drawn (so a step never replays its own samples). It replays
  during task 0 too, as soon as it holds anything.
- Each step draws `replay_batch_size` stored samples (uniformly, with replacement), prepares them with
  `datamodule.prepare_replayed` (the current batch's augmentation, with its own draws, normalisation and each
  sample's own task transform) and appends them to the step's batch (`Regularizer.training_batch`); the module's
  forward and the scenario's cross-entropy (the mean over current and replayed samples) then cover both.
- Which outputs a replayed sample trains: the scenario's `train_view`, with each sample's own task id and label —
  task-incremental: its own task's head; class-incremental: all classes seen so far (the replayed old classes are
  what stops the new ones from taking over); domain-incremental: the shared head. `scenario.train_classes=current`
  has no outputs for replayed old classes and is refused.
- DDP: the buffer is identical on every rank (the step's samples of all ranks are gathered in rank order and every
  rank adds the same global batch with the same generator); each rank replays its contiguous chunk of the same
  global replay draw, so `replay_batch_size` must be a multiple of the number of processes.

The buffer is regularizer state: `state_dict` holds its tensors, counts and generator, so a run resumed in the
middle of a task continues with the same buffer and the same draws.
"""

from __future__ import annotations

import torch

from src.continual.validate import ConfigError
from src.methods.base import Regularizer
from src.methods.replay_buffer import ReplayBuffer, gather_batch


class ER(Regularizer):
    #: the logits of stored samples are kept too (DER++)
    stores_logits = False

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 128, sampling: str = "reservoir",
                 seed: int = 0):
        if not (isinstance(replay_batch_size, int) and not isinstance(replay_batch_size, bool)
                and replay_batch_size >= 1):
            raise ConfigError(f"method.replay_batch_size={replay_batch_size!r} is invalid: an integer >= 1")
        self.buffer = ReplayBuffer(buffer_size, sampling, seed)
        self.replay_batch_size = replay_batch_size
        self._step: dict = {}  # between `training_batch` and `loss` of one step: the current batch's raw samples, …

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def on_task_start(self, task, module, datamodule) -> None:
        self._check(module)

    def training_batch(self, module, batch):
        if self.buffer.n_classes is None:  # first step of this process (also after a resume, which skips task start)
            self._check(module)
        if not hasattr(batch, "raw"):
            raise TypeError(f"{type(self).__name__} needs the step's raw samples: a TrainingBatch from the DataModule")
        self._step = {"raw": batch.raw, "current": len(batch[1])}
        replays = self._draw(module, batch, self.draws)
        if not replays:
            return batch
        prepared = module.trainer.datamodule.prepare_replayed(
            tuple(torch.cat([r[k] for r in replays]) for k in ("images", "labels", "task_ids")), batch.step)
        self._step["replayed"] = replays
        return tuple(torch.cat([current, replayed]) for current, replayed in zip(batch, prepared, strict=True))

    def loss(self, module, batch, logits, task_loss):
        self._store(logits)
        return {"loss": task_loss}

    # ---- the buffer ----------------------------------------------------------------------------------------------
    #: how many replay batches a step draws (DER++ draws two)
    draws = 1

    def _draw(self, module, batch, count: int) -> list[dict]:
        world = module.trainer.world_size if getattr(module, "_trainer", None) is not None else 1
        rank = module.global_rank if world > 1 else 0
        out = []
        for _ in range(count):
            replay = self.buffer.sample(self.replay_batch_size, batch[0].device, rank, world)
            if replay is None:
                return []
            out.append(replay)
        return out

    def _store(self, logits: torch.Tensor | None) -> None:
        """Offer the step's raw samples (gathered from every rank, in rank order) to the buffer."""
        x, y, t = self._step["raw"]
        if self.stores_logits:
            self.buffer.add(*gather_batch(x, y, t, logits[: self._step["current"]].detach().float()))
        else:
            self.buffer.add(*gather_batch(x, y, t))

    def _check(self, module) -> None:
        scenario = module.scenario
        if getattr(scenario, "train_classes", "seen") == "current":
            raise ConfigError("scenario.train_classes='current' is invalid with replay: replayed samples of earlier "
                              "tasks have no outputs there (use seen)")
        world = module.trainer.world_size if getattr(module, "_trainer", None) is not None else 1
        if self.replay_batch_size % world:
            raise ConfigError(f"method.replay_batch_size={self.replay_batch_size} is invalid: a multiple of the "
                              f"{world} processes (each replays its equal chunk)")
        self.buffer.set_classes(scenario.n_tasks * scenario.classes_per_task, scenario.classes_per_task)

    # ---- state ---------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"buffer_size": self.buffer.capacity, "buffer_held": len(self.buffer), "samples_seen": self.buffer.seen}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.buffer.load_state_dict(state["buffer"])
