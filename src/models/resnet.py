"""ResNet-18 for small images (He et al. 2016), with a 3×3 stride-1 stem and no max-pooling, for 32×32 inputs.

- `resnet18_reduced` (`width=20`): the reduced ResNet-18 of Lopez-Paz & Ranzato (2017, GEM), used by A-GEM, ER and
  DER: four stages of two basic blocks with 20, 40, 80, 160 channels; 160 features.
- `resnet18` (`width=64`): full width (64…512 channels); 512 features.

Stages 2–4 halve the resolution; the final map is average-pooled over all positions (for 32×32 inputs a 4×4 map,
as in the GEM code), so other sizes work too — down to 8×8, below which a stage would see a 1-pixel map.
"""

from __future__ import annotations

from torch import nn

from src.continual.validate import ConfigError


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm, plus the input (through a 1×1 conv when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    MIN_SIZE = 8  # three stride-2 stages: 8 → 4 → 2 → 1

    def __init__(self, input_shape: tuple[int, ...], width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model=resnet needs images (C, H, W), but the dataset's input shape is {tuple(input_shape)}")
        if min(input_shape[1:]) < self.MIN_SIZE:
            raise ConfigError(
                f"model=resnet: input {tuple(input_shape)} is too small; it needs at least "
                f"{self.MIN_SIZE}×{self.MIN_SIZE} pixels (three stages halve the resolution)"
            )
        layers = [nn.Conv2d(input_shape[0], width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        in_ch = width
        for stage, n_blocks in enumerate(blocks):
            out_ch = width * 2**stage
            for b in range(n_blocks):
                layers.append(BasicBlock(in_ch, out_ch, stride=2 if stage > 0 and b == 0 else 1))
                in_ch = out_ch
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = in_ch

    def forward(self, x):
        return self.net(x)


def resnet18_reduced(input_shape: tuple[int, ...]) -> ResNet:
    """The reduced ResNet-18 of GEM/A-GEM/ER/DER (width 20, 160 features)."""
    return ResNet(input_shape, width=20)


def resnet18(input_shape: tuple[int, ...]) -> ResNet:
    """Full-width ResNet-18 with a 3×3 stem for 32×32 inputs (512 features)."""
    return ResNet(input_shape, width=64)
