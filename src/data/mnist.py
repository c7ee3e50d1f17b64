"""MNIST (LeCun et al. 1998): 60,000 training and 10,000 test greyscale 28×28 images of the digits 0–9.

The four official IDX `.gz` files are looked for in `<root>/mnist`, then in `system_dir` (if given), and else
downloaded from `url` (by default the mirror torchvision uses, as yann.lecun.com no longer serves them reliably) into
`<root>/mnist`. Each file is checked against the md5 of the official `.gz` file before it is parsed; a corrupt or
truncated download is removed, so that the next run fetches it again.
"""

from __future__ import annotations

from pathlib import Path

from src.data.download import DatasetError, files_to_fetch, find_or_download, read_gz_verified, verify_md5
from src.data.idx import parse_idx
from src.data.source import ImageData

OFFICIAL_URL = "https://ossci-datasets.s3.amazonaws.com/mnist"

# md5 of the official .gz files (the same values as torchvision's).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

FOLDER = "mnist"


class MNIST:
    """Source of MNIST tensors; configured by `conf/dataset/{split,permuted,rotated}_mnist.yaml`.

    `md5`: the expected md5 of each `.gz` file (default: the official ones; tests pass those of generated files);
    `verify_checksums=False` skips the check (the files must still parse).
    """

    n_classes, input_shape = 10, (1, 28, 28)  # known before loading, for config checks

    def __init__(
        self,
        root: str,
        system_dir: str | None = None,
        url: str | None = OFFICIAL_URL,
        verify_checksums: bool = True,
        md5: dict[str, str] | None = None,
    ):
        self.root, self.system_dir, self.url = root, system_dir, url
        self.md5 = dict(OFFICIAL_MD5 if md5 is None else md5) if verify_checksums else None

    def files_to_download(self) -> list[Path]:
        """The files `load()` would download (a stat each, for the config check)."""
        download_dir = Path(self.root) / FOLDER
        search = [download_dir] + ([Path(self.system_dir)] if self.system_dir else [])
        return files_to_fetch(OFFICIAL_MD5, search, download_dir) if self.url else []

    def _load_file(self, filename: str):
        download_dir = Path(self.root) / FOLDER
        search = [download_dir] + ([Path(self.system_dir)] if self.system_dir else [])

        def verify(path: Path):
            verify_md5(path, None if self.md5 is None else self.md5[filename])
            return parse_idx(read_gz_verified(path, None), name=str(path))

        try:
            return find_or_download(filename, search, download_dir, self.url, verify)
        except DatasetError as err:
            raise DatasetError(
                f"{err}. A bad file in {download_dir} is removed, so the next run downloads it again; or fetch the "
                f"four .gz files from {OFFICIAL_URL} into {download_dir}"
            ) from None

    def load(self) -> ImageData:
        train_x, train_y = self._load_file("train-images-idx3-ubyte.gz"), self._load_file("train-labels-idx1-ubyte.gz")
        test_x, test_y = self._load_file("t10k-images-idx3-ubyte.gz"), self._load_file("t10k-labels-idx1-ubyte.gz")
        for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DatasetError(f"MNIST {split}: {tuple(images.shape)} images but {tuple(labels.shape)} labels")
        return ImageData(
            train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), n_classes=10,
            mean=(0.1307,), std=(0.3081,), class_names=tuple(str(d) for d in range(10)),
        )
