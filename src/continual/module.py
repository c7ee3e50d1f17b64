"""The continual LightningModule: backbone + scenario heads + one regularizer, and nothing method-specific."""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from src.continual.checkpointing import capture_rng
from src.continual.scenarios import Scenario
from src.methods.base import Regularizer


class NonFiniteLossError(RuntimeError):
    pass


class ContinualModule(L.LightningModule):
    """Trains the current task with `scenario`'s cross-entropy plus whatever `regularizer` adds.

    `optimizer` is a factory (a Hydra `_partial_` optimizer) called with the trainable parameters. With
    `reset_optimizer=True` (the default) each task starts with a fresh optimizer state, as most continual-learning
    code does; with False, Adam's moments carry over from the previous task.
    """

    def __init__(
        self,
        backbone: nn.Module,
        scenario: Scenario,
        regularizer: Regularizer,
        optimizer,
        reset_optimizer: bool = True,
        steps_per_batch: int = 1,
    ):
        super().__init__()
        # K > 1: each training batch is a list of K (or fewer) steps' batches, run here with manual optimisation so
        # that Lightning's per-batch overhead is paid once per K optimizer steps (docs/speed.md)
        self.steps_per_batch = steps_per_batch
        self.automatic_optimization = steps_per_batch == 1
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, scenario.n_outputs)
        self.scenario, self.regularizer = scenario, regularizer
        self.optimizer_factory, self.reset_optimizer = optimizer, reset_optimizer
        self.current_task = 0
        self.trained_up_to = -1  # tasks 0…trained_up_to have been trained (used by evaluation)
        self.task_accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=scenario.n_outputs, average="micro", sync_on_compute=True)
            for _ in range(scenario.n_tasks)
        )
        self.last_eval: list[float] = []
        self.loop_state: dict = {}  # the task loop's own progress, stored in checkpoints
        self._optimizer_state = None
        self._nonfinite: torch.Tensor | None = None  # whether a loss since the last check was not finite
        self.first_step_at: float | None = None  # wall clock of the first training step (start-up time)

    def __setattr__(self, name, value) -> None:
        # Lightning sets `_current_fx_name` (a str) around every hook call, about 40 times a training step, and
        # nn.Module.__setattr__ first checks parameters, buffers and submodules: ~2% of an MLP step (docs/speed.md).
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # ---- training ------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def training_step(self, batch, batch_idx):
        if not self.automatic_optimization:
            return self._training_steps(batch)
        terms, task_loss = self._loss_terms(batch)
        # Lightning's `log` costs about as much as the MLP's whole step, so log only on the steps the loggers write.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.check_finite()
            if "task_loss" not in terms:
                terms = {**terms, "task_loss": task_loss}
            self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, on_step=True,
                          on_epoch=False, prog_bar=True)
        return terms["loss"]

    def _loss_terms(self, batch):
        batch = self.regularizer.training_batch(self, batch)  # a replay method appends replayed samples
        x, labels, task_ids = batch
        logits = self(x)
        view, targets = self.scenario.train_view(logits, labels, task_ids, self.current_task)
        task_loss = F.cross_entropy(view, targets)
        terms = self.regularizer.loss(self, batch, logits, task_loss)
        # Non-finite losses are flagged on the device and looked at only on logging steps, at the end of each task
        # and before any checkpoint: checking every step would make a GPU wait for each step before queuing the next.
        bad = ~torch.isfinite(terms["loss"].detach())
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return terms, task_loss

    def _training_steps(self, batches) -> None:
        """steps_per_batch > 1: one optimizer step per batch of the list, as automatic optimisation would take them
        (forward and loss, zero_grad, backward, step); `global_step` counts each step."""
        optimizer = self.optimizers()
        every = self.trainer.log_every_n_steps
        for batch in batches:
            terms, task_loss = self._loss_terms(batch)
            optimizer.zero_grad()
            self.manual_backward(terms["loss"])
            optimizer.step()
            self.regularizer.after_optimizer_step(self)
            if every and self.global_step % every == 0:
                self.check_finite()
                if "task_loss" not in terms:
                    terms = {**terms, "task_loss": task_loss}
                self._log_train(terms)

    def optimizer_step(self, *args, **kwargs) -> None:
        """Automatic optimisation: Lightning calls this once per optimizer step (after the last of
        `accumulate_grad_batches` batches), so the regularizer's hook runs exactly once per step, as in manual mode."""
        super().optimizer_step(*args, **kwargs)
        self.regularizer.after_optimizer_step(self)

    def _log_train(self, terms: dict) -> None:
        """Write the train terms as automatic optimisation does (Lightning's own logging counts batches, not steps,
        under manual optimisation): at the step that has just been taken, numbered from 0 as Lightning numbers it,
        with the epoch; and show them on the progress bar."""
        values = {f"train/{name}": float(value.detach()) for name, value in terms.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step - 1)
            logger.save()
        self.log_dict(values, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if not self.reset_optimizer and self._optimizer_state is not None:
            optimizer.load_state_dict(self._optimizer_state)
        return optimizer

    def check_finite(self) -> None:
        """Raise if a loss since the last check was NaN or infinite (the run then fails with exit 3)."""
        bad, self._nonfinite = self._nonfinite, None
        if bad is not None and bool(bad):
            raise NonFiniteLossError(
                f"non-finite loss in task {self.current_task} at step {self.global_step} (or in the "
                f"{self.trainer.log_every_n_steps - 1} steps before it); the last good checkpoint is kept "
                "(lower the learning rate or the method's strength?)"
            )

    def on_train_end(self) -> None:
        self.check_finite()
        if not self.reset_optimizer:
            self._optimizer_state = self.trainer.optimizers[0].state_dict()

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        for metric in self.task_accuracy:
            metric.reset()

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, labels, task_ids = batch
        view, targets = self.scenario.eval_view(self(x), labels, task_ids, self.trained_up_to)
        self.task_accuracy[dataloader_idx].update(view.argmax(dim=1), targets)

    def on_test_epoch_end(self) -> None:
        # compute() sums correct/total over DDP ranks, each of which saw a disjoint shard of every task
        # one metric per evaluation loader, in order (the task loop maps them back to tasks: eval.tasks)
        n = len(self.trainer.test_dataloaders) if self._trainer is not None else len(self.task_accuracy)
        self.last_eval = [float(metric.compute()) for metric in self.task_accuracy[:n]]

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never save weights that a non-finite loss may have spoilt
        checkpoint["regularizer"] = self.regularizer.state_dict()
        checkpoint["continual"] = {
            **self.loop_state,
            "current_task": self.current_task,
            "trained_up_to": self.trained_up_to,
            "optimizer_carried": self._optimizer_state,
            "rng": capture_rng(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.regularizer.load_state_dict(checkpoint.get("regularizer", {}))
        state = checkpoint.get("continual", {})
        self.current_task = state.get("current_task", 0)
        self.trained_up_to = state.get("trained_up_to", -1)
        self._optimizer_state = state.get("optimizer_carried")
        self.loop_state = {k: v for k, v in state.items() if k not in ("current_task", "trained_up_to", "optimizer_carried")}

