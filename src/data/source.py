"""What every dataset source hands to the DataModule: whole splits as tensors, parsed once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageData:
    """A labelled image set kept as tensors.

    `train_x`/`test_x` are uint8 N×C×H×W (never converted per sample); labels are int64 class ids of the source.
    `mean`/`std` are per-channel statistics of the training images in [0, 1], used to normalise whole batches on the
    training device.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])
