"""Fully connected backbone: the 784-400-400 ReLU network of the Split/Permuted MNIST protocols."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (400, 400), dropout: float = 0.0):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.net(x)
