"""A pretrained library model as our backbone's trunk, optionally frozen (`model.freeze_trunk=true`).

One base for the timm and transformers adapters: a frozen trunk has no trainable parameters and stays in eval mode
whatever Lightning's `module.train()` says (BatchNorm statistics kept, no dropout), so EWC's Fisher, LwF's teacher
and the optimizer see exactly the heads (and LoRA adapters, which are unfrozen after this)."""

from __future__ import annotations

import warnings

from torch import nn


class PretrainedTrunk(nn.Module):
    def __init__(self, trunk: nn.Module, out_features: int, freeze_trunk: bool):
        super().__init__()
        self.trunk = trunk
        self.out_features = int(out_features)
        self.frozen = freeze_trunk
        if freeze_trunk:
            for p in trunk.parameters():
                p.requires_grad_(False)
            # Lightning warns about modules in eval mode when training starts: here that is the point
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        return self
