"""Any timm architecture as the backbone (`model=timm`): the pooled features of `timm.create_model(name,
num_classes=0)` go into the scenario heads.

`model.pretrained`:
- `false`: random initialisation, built for the data as they are (their channels via `in_chans`; models with a fixed
  input size, such as ViTs, get `img_size` = the images' size rounded up to a multiple of the patch size), normalised
  by the DataModule with the dataset's statistics, as every other backbone is.
- `true`: timm's own weights for `model.name` (a tag such as `vit_base_patch16_224.augreg2_in21k_ft_in1k` picks one),
  fetched with huggingface_hub into its cache (`HF_HOME`, default ~/.cache/huggingface) on first use; offline and not
  cached, the run stops before training with one line saying what was looked for and how to provide it.
- a path: a weights file (.safetensors, .pth, .bin) or a folder holding one (model.safetensors, pytorch_model.bin).

`model.sha256` (optional) is checked against the weights file before it is loaded.

A pretrained model gets its inputs as its pretraining did, on the training device, inside its forward
(`PretrainedInput`): grey images repeated to 3 channels, resized to the pretrained input size (`model.image_size`
overrides it), normalised with the pretrained mean and std. For that the DataModule hands such a backbone x/255 in
[0, 1] instead of dataset-normalised images (`normalizes_inputs = True`, read by
`TaskSequenceDataModule.normalization`); task transforms (permutations, rotations) then act on [0, 1] images.

`model.freeze_trunk`: the timm model never trains and stays in eval mode (BatchNorm statistics kept, no dropout);
`model.lora.r` > 0: LoRA adapters (src/models/lora.py) on `model.lora.target_modules` (null: every nn.Linear
layer), the rest frozen.

timm imports torchvision when it is imported, though only its data pipeline (which this project does not use) needs
it; this project never installs torchvision (setup.sh installs timm with --no-deps), so `import_timm` provides
placeholders for the duration of the import when torchvision is absent: anything that would really use torchvision
raises ModuleNotFoundError.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from src.continual.validate import ConfigError
from src.models.hub import HubUnreachable, cache_first
from src.models.lora import add_lora, check_lora, check_sha256, linear_layer_names, lora_enabled, weights_file
from src.models.speed import apply_switches, check_switches
from src.models.trunk import PretrainedTrunk


# ---- importing timm without torchvision -----------------------------------------------------------------------------
class _Missing(type):
    """A torchvision name timm refers to at import time: any attribute is another placeholder, a call raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise ModuleNotFoundError(f"torchvision is not installed (timm needs it for {cls.__name__})")


class _MissingModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(name, (), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _MissingModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def _torchvision_placeholders():
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        yield
        return
    finder = _PlaceholderFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:  # nothing outside timm's own module objects keeps seeing the placeholders
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def import_timm():
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        with _torchvision_placeholders():
            import timm
    except ImportError as err:
        raise ConfigError(f"model=timm needs the timm package ({err}): run `bash setup.sh`, or "
                          "`pip install --no-deps timm`") from None
    return timm


# ---- the input a pretrained model expects ---------------------------------------------------------------------------
class PretrainedInput(nn.Module):
    """x in [0, 1] → the pretrained model's input: 3 channels, its input size, its mean and std (batched, on the
    device). Bilinear/bicubic resizing and the per-channel affine commute, so their order does not matter."""

    def __init__(self, channels: int, size: tuple[int, int], mean, std, interpolation: str = "bicubic"):
        super().__init__()
        self.channels, self.size = channels, tuple(size)
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            smaller = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False if self.mode != "nearest" else None,
                              antialias=smaller and self.mode != "nearest")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}, mode={self.mode}"


class TimmBackbone(PretrainedTrunk):
    """`input → features`: (PretrainedInput →) the timm model with its classifier removed."""

    def __init__(self, trunk: nn.Module, preprocess: nn.Module | None, freeze_trunk: bool):
        super().__init__(trunk, trunk.num_features, freeze_trunk)
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.normalizes_inputs = preprocess is not None
        self.train(self.training)

    def forward(self, x):
        return self.trunk(self.preprocess(x))


def _pretrained_cfg(timm, name: str) -> dict:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _hub_weights(timm, name: str, cfg: dict):
    """The local path of timm's weights for `name` (downloaded into the Hugging Face cache when online), or None when
    timm fetches them some other way (a plain URL, torch.hub's cache)."""
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]

    def download(local_files_only: bool):
        """The first of `filenames` there is (cached, or in the repo online)."""
        for filename in filenames:
            try:
                return hf_hub_download(repo, filename, revision=revision or None, local_files_only=local_files_only)
            except EntryNotFoundError as err:  # not cached / not in the repo: the next name
                if not local_files_only and isinstance(err, LocalEntryNotFoundError):
                    raise  # online but no network (after huggingface_hub's retries): the next name won't do either
                last = err
        raise last

    try:
        return cache_first(download)
    except Exception as err:
        reason = str(err) if isinstance(err, HubUnreachable) else type(err).__name__
        raise ConfigError(
            f"model.pretrained=true: timm's weights for {name} (Hugging Face hub repo {repo}, {filenames[0]}) are not "
            f"in the Hugging Face cache and cannot be downloaded ({reason}); run once online, or download the "
            f"file and set model.pretrained=<its path> (on machines without internet, HF_HUB_OFFLINE=1 makes this "
            f"check instant)"
        ) from None


def build_timm_backbone(
    input_shape: tuple[int, ...],
    name: str,
    pretrained: bool | str = False,
    sha256: str | None = None,
    image_size: int | list[int] | None = None,
    freeze_trunk: bool = False,
    lora=None,
    kwargs=None,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    check_switches(channels_last, compile, compile_mode)
    check_lora(lora)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name={name!r} is invalid: a timm architecture (e.g. resnet18, vit_base_patch16_224)")
    if not (isinstance(pretrained, bool) or (isinstance(pretrained, str) and pretrained)):
        raise ConfigError(f"model.pretrained={pretrained!r} is invalid: false, true (timm's weights) or a weights path")
    if sha256 and pretrained is False:
        raise ConfigError(f"model.sha256={sha256} is invalid: it checks the weights file, and model.pretrained=false")
    timm = import_timm()
    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        raise ConfigError(f"model.name={name!r} is invalid: not a timm architecture (see timm.list_models())")
    extra = dict(kwargs or {})
    channels, height, width = (tuple(input_shape) + (1, 1, 1))[:3] if len(input_shape) == 3 else (None, None, None)
    if channels is None:
        raise ConfigError(f"model=timm needs images (C, H, W); the dataset's input shape is {tuple(input_shape)}")
    cfg = _pretrained_cfg(timm, name)

    preprocess = None
    if pretrained is False:
        extra.setdefault("in_chans", channels)
        if cfg.get("fixed_input_size") and "img_size" not in extra:
            extra["img_size"] = (height, width)
            probe = _create(timm, name, False, None, extra)  # for the patch size
            patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
            if patch is not None:
                extra["img_size"] = (math.ceil(height / patch[0]) * patch[0], math.ceil(width / patch[1]) * patch[1])
        if image_size is not None or _size(extra.get("img_size", (height, width))) != (height, width):
            size = _size(image_size) if image_size is not None else _size(extra["img_size"])
            preprocess = _Resize(size)
        file = None
    else:
        file = weights_file(pretrained) if isinstance(pretrained, str) else _hub_weights(timm, name, cfg)
        if file is not None:
            check_sha256(file, sha256)
        elif sha256:
            raise ConfigError(f"model.sha256={sha256} is invalid: timm fetches the weights of {name} from a URL, not "
                              "a file known beforehand; download it and set model.pretrained=<its path>")
        if image_size is not None:
            size = _size(image_size)
            if cfg.get("fixed_input_size"):  # e.g. a ViT: its position embeddings are resampled to this size
                extra.setdefault("img_size", size)
        elif "img_size" in extra:
            size = _size(extra["img_size"])
        else:
            size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        preprocess = PretrainedInput(len(mean), size, mean, std, cfg.get("interpolation", "bicubic"))
    trunk = _create(timm, name, pretrained is not False, file, extra)
    if pretrained is not False:
        trunk.eval()
    backbone = TimmBackbone(trunk, preprocess, bool(freeze_trunk))
    if isinstance(preprocess, _Resize):
        backbone.normalizes_inputs = False
    if lora_enabled(lora):
        add_lora(backbone.trunk, lora, linear_layer_names(backbone.trunk), f"timm model {name}")
    backbone.train()
    return apply_switches(backbone, channels_last, compile, compile_mode)


class _Resize(nn.Module):
    """Random-init models of a fixed input size: dataset-normalised images resized to it (bilinear)."""

    def __init__(self, size):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x):
        return x if tuple(x.shape[-2:]) == self.size else F.interpolate(x, size=self.size, mode="bilinear",
                                                                         align_corners=False)


def _size(value) -> tuple[int, int]:
    if isinstance(value, int) and value >= 1:
        return value, value
    if hasattr(value, "__len__") and len(value) == 2 and all(isinstance(v, int) and v >= 1 for v in value):
        return tuple(int(v) for v in value)
    raise ConfigError(f"model.image_size={value!r} is invalid: null (the pretrained size), an integer or [H, W]")


def _create(timm, name, pretrained: bool, file, extra: dict) -> nn.Module:
    options = dict(extra)
    if file is not None:
        options["pretrained_cfg_overlay"] = {"file": str(file)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **options)
    except ConfigError:
        raise
    except Exception as err:
        what = f"model.pretrained={'true' if file is None else str(file)!r}" if pretrained else f"model.name={name!r}"
        raise ConfigError(f"{what}: timm.create_model({name!r}, …) failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
