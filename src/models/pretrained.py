"""Building any backbone from its config, optionally with pre-trained and frozen trunk weights.

Every `conf/model/*.yaml` targets `build_backbone`: `architecture` names the backbone class (or factory), the
other keys are its arguments, and two keys work for all of them:

- `pretrained`: a checkpoint written by `python -m src.pretrain`; its trunk weights are loaded into this backbone's
  trunk. The *trunk* is the backbone's feature extractor: its `trunk` attribute if it has one (the conv layers of
  `ConvNet`, whose fully connected layers then start fresh, as in van de Ven et al.'s CIFAR-100 protocol), else the
  whole backbone.
- `freeze_trunk`: the trunk gets `requires_grad=False` and stays in eval mode whatever Lightning asks, so BatchNorm
  keeps the pre-trained statistics. The optimizer only sees the trainable parameters (the LightningModule already
  filters on `requires_grad`), so nothing else has to know.

Two speed switches apply to the finished backbone (`src/models/speed.py`, docs/speed.md): `channels_last` (conv
weights and inputs in NHWC) and `compile` (`nn.Module.compile()` in place, with `compile_mode`). Neither changes
parameter names.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from src.continual.validate import ConfigError
from src.models.speed import apply_switches, check_switches

log = logging.getLogger(__name__)
FORMAT = "continual-pretrained-trunk/1"


def trunk_of(backbone: nn.Module) -> nn.Module:
    return getattr(backbone, "trunk", backbone)


class FrozenTrunk(nn.Module):
    """A backbone whose trunk never trains: no gradients, and eval mode even when the model is put in train mode."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.out_features = backbone.out_features
        for parameter in trunk_of(backbone).parameters():
            parameter.requires_grad_(False)
        self.train(self.training)
        # Lightning warns about modules in eval mode when training starts: here that is the point.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    @property
    def trunk(self) -> nn.Module:
        return trunk_of(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()
        return self

    def forward(self, x):
        return self.backbone(x)


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_trunk(backbone: nn.Module, path: str | Path, architecture: str = "") -> None:
    """Load the trunk weights of a `src.pretrain` checkpoint; any mismatch is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.pretrained={path}: no such file (make one with `python -m src.pretrain dataset=… model=…`)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickling-policy errors alike
        raise ConfigError(f"model.pretrained={path}: not a checkpoint torch can load ({type(err).__name__})") from None
    state = checkpoint.get("trunk") if isinstance(checkpoint, dict) and "trunk" in checkpoint else checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained={path}: holds no trunk weights (expected a checkpoint of src.pretrain)")
    trunk = trunk_of(backbone)
    own = trunk.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    reshaped = {k for k in set(own) & set(state) if own[k].shape != state[k].shape}
    if missing or unexpected or reshaped:
        problems = [f"{label}: {_short(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)) if keys]
        origin = ""
        if isinstance(checkpoint, dict) and "architecture" in checkpoint:
            origin = f" (it was saved from {checkpoint['architecture']} on input {checkpoint.get('input_shape')})"
        raise ConfigError(f"model.pretrained={path} does not fit model {architecture}{origin}: {'; '.join(problems)}")
    trunk.load_state_dict(state)


def save_trunk(path: str | Path, backbone: nn.Module, architecture: str, input_shape, **info) -> Path:
    """Write a checkpoint that `model.pretrained` accepts (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "format": FORMAT, "architecture": architecture, "input_shape": list(input_shape),
        "trunk": trunk_of(backbone).state_dict(), "backbone": backbone.state_dict(), **info,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def build_backbone(
    input_shape: tuple[int, ...],
    architecture: str,
    pretrained: str | None = None,
    freeze_trunk: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    **kwargs,
) -> nn.Module:
    """`architecture(input_shape=…, **kwargs)`, then the pre-trained trunk loaded and/or frozen, then the speed
    switches (checked first, so that a bad value fails before anything is built)."""
    check_switches(channels_last, compile, compile_mode)
    module_name, _, name = architecture.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"model.architecture={architecture!r} cannot be imported ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]})") from None
    backbone = factory(input_shape=tuple(input_shape), **kwargs)
    if pretrained:
        load_trunk(backbone, pretrained, architecture)
    if freeze_trunk:
        if not pretrained:
            log.warning("model.freeze_trunk=true without model.pretrained: the trunk stays at its random initialisation")
        backbone = FrozenTrunk(backbone)
    return apply_switches(backbone, channels_last, compile, compile_mode)
