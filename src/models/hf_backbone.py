"""A Hugging Face `transformers` encoder as the backbone (`model=hf`): pooled features into the scenario heads.

`model.name` is a hub id (`bert-base-uncased`) or a local folder (config.json, tokenizer files, weights) — the
tokenizer of `dataset=text_files`/`text_cl5` is loaded from the same name (`dataset.source.tokenizer: ${model.name}`).
`model.pretrained`: `true` (the weights of `model.name`), `false` (its config only, random initialisation), or a
weights file/folder (loaded into the architecture of `model.name`). Offline, a hub id that is not in the Hugging Face
cache stops the run before training with one line. `model.sha256` checks the weights file before loading.

Inputs are the text DataModule's batches: int tensors B × 2 × L holding token ids (row 0) and the attention mask
(row 1), so that a batch stays one tensor like an image batch (src/data/text.py). `model.pooling`: `cls` (the first
token's last hidden state, BERT's convention) or `mean` (the mean over unmasked tokens).

`model.freeze_trunk` and `model.lora` as for timm (src/models/lora.py); LoRA's default targets are peft's for the
model type (BERT: query, value), else every nn.Linear.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from src.continual.validate import ConfigError
from src.models.hub import HubUnreachable, cache_first
from src.models.lora import add_lora, check_lora, check_sha256, linear_layer_names, lora_enabled, weights_file
from src.models.speed import apply_switches, check_switches
from src.models.trunk import PretrainedTrunk

POOLINGS = ("cls", "mean")


class HFBackbone(PretrainedTrunk):
    def __init__(self, encoder: nn.Module, pooling: str, freeze_trunk: bool):
        super().__init__(encoder, encoder.config.hidden_size, freeze_trunk)
        self.pooling = pooling
        self.train(self.training)

    def forward(self, x):
        ids, mask = x[:, 0].long(), x[:, 1].long()
        hidden = self.trunk(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _offline_hint(name: str) -> str:
    return (f"model.name={name!r}: not a local folder, and its files are not in the Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and cannot be downloaded (offline?); run once online, "
            f"or `hf download {name} --local-dir <folder>` and set model.name=<folder>")


def load_config(name: str, **kwargs):
    """The model's config, with those of `kwargs` that are config attributes set (e.g. `hidden_dropout_prob=0`);
    returns (config, the other kwargs), which go to the model's constructor."""
    from transformers import AutoConfig

    try:
        return cache_first(lambda **where: AutoConfig.from_pretrained(name, return_unused_kwargs=True, **kwargs, **where))
    except HubUnreachable as err:
        raise ConfigError(f"{_offline_hint(name)} ({err})") from None
    except OSError:
        raise ConfigError(_offline_hint(name)) from None
    except ValueError as err:
        raise ConfigError(f"model.name={name!r} is invalid: {str(err).splitlines()[0]}") from None


def _local_weights(name: str, pretrained) -> Path | None:
    """The weights file that will be loaded, when it can be known before loading (a folder or a file)."""
    if isinstance(pretrained, str):
        return weights_file(pretrained)
    if Path(name).expanduser().is_dir():
        return weights_file(name, "model.name")
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(name, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def build_hf_backbone(
    input_shape: tuple[int, ...],
    name: str,
    pretrained: bool | str = True,
    pooling: str = "cls",
    sha256: str | None = None,
    freeze_trunk: bool = False,
    lora=None,
    kwargs=None,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    check_switches(channels_last, compile, compile_mode)
    check_lora(lora)
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling={pooling!r} is invalid: one of {', '.join(POOLINGS)}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name={name!r} is invalid: a Hugging Face hub id or a local model folder")
    if not (isinstance(pretrained, bool) or (isinstance(pretrained, str) and pretrained)):
        raise ConfigError(f"model.pretrained={pretrained!r} is invalid: true, false or a weights file/folder")
    if sha256 and pretrained is False:
        raise ConfigError(f"model.sha256={sha256} is invalid: it checks the weights file, and model.pretrained=false")
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ConfigError(f"model=hf needs text batches (2 × max_length: token ids and attention mask); the dataset's "
                          f"input shape is {tuple(input_shape)} (use dataset=text_files or text_cl5)")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "weights not initialised" notices for the unused pooler and the like
    config, extra = load_config(name, **dict(kwargs or {}))
    if pretrained is False:
        encoder = AutoModel.from_config(config, **extra)
    else:
        file = _local_weights(name, pretrained)
        if sha256:
            if file is None:
                raise ConfigError(f"model.sha256={sha256} is invalid: the weights of {name} are not downloaded yet "
                                  "(run once without model.sha256, or download them and set model.name=<folder>)")
            check_sha256(file, sha256)
        source = name if not isinstance(pretrained, str) else (pretrained if Path(pretrained).is_dir() else None)
        try:
            if source is None:  # a single weights file: the architecture of `name`, then its state dict
                encoder = AutoModel.from_config(config, **extra)
                _load_file(encoder, file)
            else:
                encoder = AutoModel.from_pretrained(source, config=config, **extra)
        except OSError:
            raise ConfigError(_offline_hint(name)) from None
    if max(input_shape[1], 1) > getattr(config, "max_position_embeddings", 1 << 30):
        raise ConfigError(f"dataset.max_length={input_shape[1]} is invalid: {name} takes at most "
                          f"{config.max_position_embeddings} tokens")
    backbone = HFBackbone(encoder, pooling, bool(freeze_trunk))
    if lora_enabled(lora):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets = DEFAULTS.get(getattr(config, "model_type", ""), None) or linear_layer_names(encoder)
        add_lora(backbone.trunk, lora, targets, f"{name} ({getattr(config, 'model_type', '?')})")
    backbone.train()
    return apply_switches(backbone, channels_last, compile, compile_mode)


def _load_file(encoder: nn.Module, file: Path) -> None:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    prefix = getattr(encoder, "base_model_prefix", "")
    if prefix and all(k.startswith(prefix + ".") for k in state):  # saved from a model with a task head
        state = {k[len(prefix) + 1:]: v for k, v in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ConfigError(f"model.pretrained={str(file)!r} does not fit {type(encoder).__name__}: "
                          f"{len(missing)} missing, {len(unexpected)} unexpected keys")
