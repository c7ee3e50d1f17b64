"""Two one-switch speed options for the backbone: `model.channels_last` and `model.compile` (see docs/speed.md).

Both leave parameter names unchanged. `state_dict` keys, EWC's parameter names and anchors, LwF's teacher weights
and checkpoints therefore work the same with either switch on or off.

- `channels_last`: the conv weights, and every 4-D input via a forward pre-hook on the backbone, are stored in
  `torch.channels_last` (NHWC). cuDNN's tensor-core conv kernels want NHWC, so this helps conv nets on a GPU (mostly
  under mixed precision). A backbone with no 4-D weight (the MLP) is left alone: there is nothing to gain there, and
  converting its image input would only add copies before the flatten.
- `compile`: `nn.Module.compile()` compiles the backbone's `__call__` in place. Unlike `torch.compile(module)`, it
  adds no `_orig_mod.` wrapper, so the module tree and its parameters stay the same objects with the same names.

The caveat is hooks. Dynamo does not guard on module hooks by default (`skip_nnmodule_hook_guards`), so a hook added
to a submodule *after* compilation never runs inside the compiled forward. Code that hooks modules (the EWC Fisher)
must therefore run the forward under `eager()`. Also, `copy.deepcopy` drops the compiled forward
(`Module.__getstate__` pops it), so copies such as LwF's teacher are compiled again with `compile_copy`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from src.continual.validate import ConfigError

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The compile options live on the module as a plain attribute so that they survive `copy.deepcopy`,
# which keeps ordinary attributes but drops the compiled forward.
_COMPILE_OPTIONS = "_continual_compile_options"


def check_switches(channels_last, compile, compile_mode) -> None:
    """Reject bad values with one line naming the key, before anything is built (Hydra passes `maybe` as a str)."""
    for key, value in (("model.channels_last", channels_last), ("model.compile", compile)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: true or false")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ConfigError(f"model.compile_mode={compile_mode!r} is invalid: null or one of {', '.join(COMPILE_MODES)}")


def apply_switches(backbone: nn.Module, channels_last: bool = False, compile: bool = False,
                   compile_mode: str | None = None) -> nn.Module:
    """Apply the switches to a built backbone in place. channels_last goes first, so that the compiled forward
    traces its input pre-hook. Returns the same module."""
    check_switches(channels_last, compile, compile_mode)
    if channels_last:
        use_channels_last(backbone)
    if compile:
        compile_in_place(backbone, compile_mode)
    return backbone


def _has_conv_weights(module: nn.Module) -> bool:
    return any(p.dim() == 4 for p in module.parameters())


def _channels_last_input(module, args):
    """Forward pre-hook: a 4-D tensor input becomes channels_last. Other inputs are passed through unchanged."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def use_channels_last(backbone: nn.Module) -> bool:
    """Put the 4-D parameters and buffers, and the 4-D inputs, in channels_last. Returns whether anything changed.

    The input conversion is a forward pre-hook rather than a wrapper module, so `state_dict` keys stay the same.
    """
    if not _has_conv_weights(backbone):
        log.info("model.channels_last=true: %s has no conv weights, left as it is", type(backbone).__name__)
        return False
    backbone.to(memory_format=torch.channels_last)  # only 4-D tensors are affected
    backbone.register_forward_pre_hook(_channels_last_input)
    return True


def compile_in_place(module: nn.Module, mode: str | None = None) -> nn.Module:
    """`module.compile(mode=…)`: the module's own `__call__` is compiled, so names and objects stay as they are."""
    options = {} if mode is None else {"mode": mode}
    setattr(module, _COMPILE_OPTIONS, options)
    module.compile(**options)
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_copy(duplicate: nn.Module) -> nn.Module:
    """Compile again, with the original's options, every submodule of a deep copy whose original was compiled.

    `copy.deepcopy` keeps the options attribute but drops the compiled forward. Without this, the copy is correct
    but runs eagerly.
    """
    for module in duplicate.modules():
        options = getattr(module, _COMPILE_OPTIONS, None)
        if options is not None and not is_compiled(module):
            module.compile(**options)
    return duplicate


@contextlib.contextmanager
def eager():
    """Run every compiled module eagerly for the duration (`torch.compiler.set_stance("force_eager")`).

    This is for code that adds hooks to modules that may already be compiled: Dynamo would not see those hooks, and
    the compiled forward would silently skip them. It also avoids compiling a graph for a single forward, as in the
    shape check of config validation.
    """
    with torch.compiler.set_stance("force_eager"):
        yield
