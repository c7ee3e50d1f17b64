"""What every dataset source hands to the DataModule: whole splits as tensors, parsed once."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf


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


class LoadingInBackground:
    """`source.load()` started in a thread now and collected by the first `load()`; other attributes pass through.

    `python -m src.train` starts it before importing Lightning, which takes seconds and holds the GIL only part of
    the time, while loading is mostly decompression, hashing and copying in C that releases it: the dataset is ready
    when the Trainer is. An error is raised by `load()`, in the caller's thread, as if the source had been loaded
    there.
    """

    def __init__(self, source):
        self.source = source
        self._data, self._error = None, None
        self._thread = threading.Thread(target=self._load, name="dataset-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._data = self.source.load()
        except BaseException as err:  # handed to the caller of load()
            self._error = err

    def load(self) -> ImageData:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._data

    def __getattr__(self, name):
        return getattr(self.__dict__["source"], name)


def _count_task_folders(root) -> int:
    """`${task_folders:<root>}` (conf/dataset/text_files.yaml): how many task sub-folders a text dataset has; 1 when
    there are none, so that the source itself reports the missing folder with its key (src/data/text.py)."""
    folder = Path(str(root)).expanduser()
    return max(1, sum(p.is_dir() for p in folder.iterdir())) if folder.is_dir() else 1


OmegaConf.register_new_resolver("task_folders", _count_task_folders, replace=True)
