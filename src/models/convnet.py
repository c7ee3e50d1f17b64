"""A small conv net: blocks of 3×3 conv (stride 2) + BatchNorm + ReLU, then global average pooling.

The shape follows the conv layers of van de Ven et al. (2022) for Split CIFAR (16→256 channels, each block halving
the resolution), so it fits 28×28 and 32×32 inputs alike.

Their exact Split CIFAR-100 network (`conf/model/convnet_fc.yaml`) is the variant with 5 blocks, the first of
stride 1 (`strides`), the 256×2×2 feature map flattened instead of pooled (`pooling: flatten`), and two fully
connected layers of 2000 ReLU units (`fc`). The conv blocks are the *trunk* (what `model.pretrained` loads and
`model.freeze_trunk` freezes); the fully connected layers always train.
"""

from __future__ import annotations

from torch import nn

from src.continual.validate import ConfigError


class ConvNet(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: tuple[int, ...] = (16, 32, 64, 128),
        batch_norm: bool = True,
        strides: tuple[int, ...] | None = None,
        pooling: str = "avg",
        fc: tuple[int, ...] = (),
    ):
        super().__init__()
        strides = list(strides) if strides is not None else [2] * len(channels)
        if len(input_shape) != 3:
            raise ConfigError(f"model=convnet needs images (C, H, W), but the dataset's input shape is {tuple(input_shape)}")
        if len(strides) != len(channels):
            raise ConfigError(f"model.strides={list(strides)} must have one stride per layer of model.channels={list(channels)}")
        if pooling not in ("avg", "flatten"):
            raise ConfigError(f"model.pooling={pooling!r} is invalid: avg (global average) or flatten")
        in_ch, (h, w), layers = input_shape[0], input_shape[1:], []
        for out_ch, stride in zip(channels, strides, strict=True):  # padding 1: small maps shrink to 1×1, no less
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU())
            in_ch, h, w = out_ch, (h - 1) // stride + 1, (w - 1) // stride + 1
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pooling == "avg" else [nn.Flatten()]
        self.net = nn.Sequential(*layers)
        width = in_ch if pooling == "avg" else in_ch * h * w
        hidden = []
        for units in fc:
            hidden += [nn.Linear(width, units), nn.ReLU()]
            width = units
        self.fc = nn.Sequential(*hidden)
        self.out_features = width

    @property
    def trunk(self) -> nn.Module:
        """The conv layers: what a pre-trained checkpoint provides and `freeze_trunk` freezes."""
        return self.net

    def forward(self, x):
        return self.fc(self.net(x))
