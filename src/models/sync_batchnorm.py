"""Synchronised BatchNorm on any device: the batch statistics of the GLOBAL batch, as one process computes them.

Lightning's `trainer.sync_batchnorm=true` converts BatchNorm layers to `torch.nn.SyncBatchNorm`, which refuses CPU
tensors (torch's kernels are CUDA-only, and DDP refuses SyncBatchNorm layers of a CPU module), so a CPU (gloo) DDP run
could not synchronise. `SyncBatchNormAnyDevice` is a Lightning LayerSync plugin (conf/trainer/ddp.yaml: `plugins`)
that turns every BatchNorm layer, in place, into `AnyDeviceSyncBatchNorm` for the fit (and back after it): torch's
SyncBatchNorm on accelerators, and on a CPU two differentiable all-reduces (sums, then the squared deviations from the
global mean) whose backward sums the gradients over the processes, so the gradient is that of the global batch too.
Running statistics are updated from the global mean and unbiased variance, as one process updates them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm


class AnyDeviceSyncBatchNorm(_BatchNorm):
    """A BatchNorm layer (its class swapped in place; `_original_class` is what it was) that normalises training
    batches with the statistics of all processes' batches together."""

    process_group = None
    _original_class: type = nn.BatchNorm2d
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _check_input_dim(self, x: torch.Tensor) -> None:
        self._original_class._check_input_dim(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        syncing = (self.training and dist.is_available() and dist.is_initialized()
                   and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)
        if not syncing:
            return self._original_class.forward(self, x)
        if x.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, x)  # torch's kernels (one all-gather of the statistics)
        self._check_input_dim(x)
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
        if self.enabled:
            for module in model.modules():
                if isinstance(module, _BatchNorm) and not isinstance(module, AnyDeviceSyncBatchNorm):
                    module._original_class, module.__class__ = type(module), AnyDeviceSyncBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, AnyDeviceSyncBatchNorm):
                module.__class__ = module._original_class
                del module._original_class
        return model
