"""Under DDP, the weight of each rank's loss that makes DDP's gradient average the gradient of the global mean.

The DataModule adds `GlobalBatchLossWeights` to the trainer when W > 1. Every full batch has equal parts (w = 1, no
work); the last batch of a pass may have parts that differ by one row, w_r = W·|part r| / g (src/data/global_batch.py).
"""

from __future__ import annotations

import lightning as L
import torch


class GlobalBatchLossWeights(L.Callback):
    """Scales the gradient flowing from each training step's loss by that step's w_r. Scaling at the loss (not at the
    parameters) keeps it exact through collectives inside the forward pass (synchronised BatchNorm's differentiable
    all-reduce), and it covers automatic and manual optimisation alike (both call `on_before_backward`)."""

    def __init__(self, datamodule):
        self.datamodule = datamodule

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        weight = self.datamodule.next_loss_weight()
        if weight != 1.0:
            loss.register_hook(lambda grad: grad * weight)
