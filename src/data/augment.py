"""Training augmentation on whole batches, on the training device: no PIL, no per-sample Python.

`TaskSequenceDataModule` applies it to training batches only (never at evaluation, nor to the batches a method
draws outside Lightning's training loop, such as a Fisher estimate), to the uint8 images before normalisation, so
padding is black as in torchvision's `RandomCrop(32, padding=4)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_device(draws: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy to a GPU from pinned memory, queued without waiting: a plain `.to("cuda")` of a CPU tensor waits for
    the copy, and with it for every kernel queued before it, at every training step."""
    if device.type == "cuda":
        return draws.pin_memory().to(device, non_blocking=True)
    return draws.to(device)


class RandomCropFlip:
    """Random crop with `padding` pixels of zero padding and random horizontal flip (p = 0.5), per sample.

    The random draws come from a CPU generator seeded with `seed` (a few numbers per sample, moved to the batch's
    device), so a run is reproducible on any device. One gather does crop and flip together.
    """

    def __init__(self, padding: int = 4, flip: bool = True, seed: int = 0):
        if padding < 0:
            raise ValueError(f"dataset.augment.padding={padding} is invalid: an integer >= 0")
        self.padding, self.flip, self.seed = padding, flip, seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor, rows: tuple[int, int] | None = None, total: int | None = None) -> torch.Tensor:
        """Augment `x`. Under DDP `x` is rows [start, stop) = `rows` of a global batch of `total` rows: the draws are
        made for all `total` rows, as one process makes them, and those of `rows` are applied."""
        n, c, h, w = x.shape
        p = self.padding
        if p == 0 and not self.flip:
            return x
        start, stop = rows if rows is not None else (0, n)
        total = n if total is None else total
        if stop - start != n or not 0 <= start <= stop <= total:
            raise ValueError(f"rows {rows} of a batch of {total} do not match {n} images")
        offsets = torch.randint(0, 2 * p + 1, (2, total), generator=self.generator)[:, start:stop]
        flips = torch.rand(total, generator=self.generator)[start:stop] < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        offsets, flips = _to_device(offsets, x.device), _to_device(flips, x.device)
        padded = F.pad(x, (p, p, p, p)) if p else x
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # n × h rows of the padded image
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - cols, cols)  # n × w, reversed if flipped
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def reseed(self, seed: int) -> None:
        """Restart the draws from `seed`: the DataModule reseeds at every training step from (seed, task, step),
        so the augmentation of a resumed run matches an uninterrupted one without saving generator state."""
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
