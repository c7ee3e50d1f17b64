"""The regularizer interface: everything a continual-learning method adds to plain training.

The LightningModule calls these hooks and knows nothing else about the method. State that must survive a task
boundary (Fisher and anchors, a teacher network, …) lives here, and `state_dict`/`load_state_dict` put it in every
checkpoint. A new method is one subclass in its own file plus one YAML file in `conf/method/`.
"""

from __future__ import annotations

import torch


class Regularizer:
    #: Train task t on the union of tasks 0…t instead of task t alone (only the `joint` upper bound does).
    trains_on_past_tasks: bool = False

    def on_task_start(self, task: int, module, datamodule) -> None:
        """Called before task `task` is trained."""

    def training_batch(self, module, batch):
        """The batch the step trains on, given the step's own (a `src.data.datamodule.TrainingBatch`: normalised
        `(x, local_label, task_id)` with `.raw`, its uint8 samples, and `.step`, its global step). A replay method
        returns it with replayed samples appended (prepared by `datamodule.prepare_replayed`), so that one forward
        and the scenario's cross-entropy cover both; `loss` then receives that batch and its logits."""
        return batch

    def loss(self, module, batch, logits: torch.Tensor, task_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss to minimise for one training batch.

        `batch` is the normalised `(x, local_label, task_id)`, `logits` the model's full output and `task_loss` the
        scenario's cross-entropy. Returns named terms; `"loss"` is the total that is optimised and every term is
        logged under `train/<name>`, so a method reports its parts (penalty, distillation, …) separately.
        """
        return {"loss": task_loss}

    def after_optimizer_step(self, module) -> None:
        """Called after every optimizer step (automatic and manual optimisation alike), with the parameters updated
        and their `.grad` still the gradient of that step's loss, e.g. for SI's path integral."""

    def on_task_end(self, task: int, module, datamodule) -> None:
        """Called after task `task` is trained, before it is evaluated; task `task`'s training data are still served."""

    def summary(self) -> dict:
        """Plain numbers about the method's state (e.g. Fisher statistics) for results.json's `method_summary`."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
