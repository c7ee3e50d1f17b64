"""Synchronised BatchNorm on any device: the batch statistics of the GLOBAL batch, as one process computes them.

Lightning's `trainer.sync_batchnorm=true` converts BatchNorm layers to `torch.nn.SyncBatchNorm`, which refuses CPU
tensors (torch's kernels are CUDA-only), so a CPU (gloo) DDP run could not synchronise. `SyncBatchNormAnyDevice` is
a Lightning LayerSync plugin (conf/trainer/ddp.yaml: `plugins`) that converts to `AnyDeviceSyncBatchNorm`: torch's own
kernels on accelerators, and on a CPU two differentiable all-reduces (sum, then the sum of squared deviations from the
global mean) whose backward sums the gradients over the processes, so the gradient is that of the global batch too.
Running statistics are updated from the global mean and unbiased variance, as one process updates them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.distributed.nn.functional import all_reduce


class AnyDeviceSyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        syncing = (self.training and x.device.type == "cpu" and dist.is_available() and dist.is_initialized()
                   and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)
        if not syncing:
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.new_tensor([float(x.numel() // x.shape[1])])
        sums = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        total = sums[-1]
        mean = sums[:-1] / total
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims), group=group) / total  # biased, for normalising
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (total / (total - 1)) if float(total) > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        return out


class SyncBatchNormAnyDevice(TorchSyncBatchNorm):
    """`trainer.sync_batchnorm` that also works on CPU processes (gloo); Lightning reverts it after each fit.
    `enabled` is `trainer.sync_batchnorm` (conf/trainer/ddp.yaml), so that key stays the switch."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for module in model.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = AnyDeviceSyncBatchNorm
        return model
