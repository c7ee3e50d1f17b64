"""A small conv net: blocks of 3×3 conv (stride 2) + BatchNorm + ReLU, then global average pooling.

The shape follows the conv layers of van de Ven et al. (2022) for Split CIFAR (16→256 channels, each block halving
the resolution), so it fits 28×28 and 32×32 inputs alike.
"""

from __future__ import annotations

from torch import nn


class ConvNet(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], channels: tuple[int, ...] = (16, 32, 64, 128), batch_norm: bool = True):
        super().__init__()
        in_ch, layers = input_shape[0], []
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU())
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = in_ch

    def forward(self, x):
        return self.net(x)
