"""LoRA adapters (Hu et al. 2022) via `peft`, for the timm and Hugging Face backbones; and the weight-file checks both
share (`model.sha256`, which file a `model.pretrained` folder means).

`peft.inject_adapter_in_model` replaces each targeted layer by a `peft` LoRA layer (the frozen `base_layer` plus two
small `nn.Linear`s, `lora_A` and `lora_B`) and leaves only the adapters trainable. The scenario heads sit outside the
backbone and stay trainable, so the optimizer, EWC's Fisher and anchors and LwF's teacher (all built from the
parameters with `requires_grad`) cover exactly LoRA + heads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from src.continual.validate import ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def lora_enabled(lora) -> bool:
    """`model.lora.r` null or 0 turns LoRA off."""
    return bool(lora) and bool(lora.get("r"))


def check_lora(lora) -> None:
    if not lora:
        return
    r, alpha, dropout = lora.get("r"), lora.get("alpha"), lora.get("dropout", 0.0)
    if not (r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 0)):
        raise ConfigError(f"model.lora.r={r!r} is invalid: null or 0 (off), or an integer >= 1 (the adapter rank)")
    if not (alpha is None or (isinstance(alpha, (int, float)) and alpha > 0)):
        raise ConfigError(f"model.lora.alpha={alpha!r} is invalid: null (= r) or a number > 0")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ConfigError(f"model.lora.dropout={dropout!r} is invalid: a number in [0, 1)")


def add_lora(model: nn.Module, lora, default_targets: list[str] | str | None, where: str) -> nn.Module:
    """Inject LoRA adapters into `model` in place (only they stay trainable). `default_targets` is used when
    `model.lora.target_modules` is null; `where` names the model in error messages."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora.get("target_modules") or default_targets
    if not targets:
        raise ConfigError(f"model.lora.target_modules=null is invalid for {where}: it has no nn.Linear layer to adapt; "
                          "name the layers (module-name suffixes, e.g. [qkv, fc1])")
    if not isinstance(targets, str):
        targets = [str(t) for t in targets]
    config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora.get("alpha") or lora["r"]), target_modules=targets,
                        lora_dropout=float(lora.get("dropout") or 0.0), bias="none")
    try:
        return inject_adapter_in_model(config, model)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora.target_modules={targets!r} is invalid for {where}: "
                          f"{str(err).splitlines()[0]}") from None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The full names of every `nn.Linear` in `model` (LoRA's default targets for a timm model): full names, since
    a suffix such as `proj` also names a ViT's patch-embedding convolution."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]


def weights_file(path: str | Path, key: str = "model.pretrained") -> Path:
    """A weights file, or the weights file inside a folder (model.safetensors, pytorch_model.bin, one *.pth/*.pt)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in path.glob(ext))
        if len(found) == 1:
            return found[0]
        raise ConfigError(f"{key}={str(path)!r} is invalid: the folder holds no single weights file "
                          f"({', '.join(WEIGHT_FILES[:2])}, or one *.safetensors/*.pth)")
    raise ConfigError(f"{key}={str(path)!r} is invalid: no such file or folder")


def check_sha256(path: Path, expected: str | None) -> None:
    """`model.sha256`: the weights file must have this SHA-256 before anything is loaded from it."""
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != str(expected).lower():
        raise ConfigError(f"model.sha256={expected} is invalid: {path} has sha256 {digest.hexdigest()}")
