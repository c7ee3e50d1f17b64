"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test greyscale 28×28 images of 10 clothing classes.

Looked for, in order, in `<root>/fashion-mnist`, in `system_dir` (Debian's `dataset-fashion-mnist` package installs
the files in /usr/share/datasets/fashion-mnist), and else downloaded from the official host into `<root>/fashion-mnist`.
"""

from __future__ import annotations

from pathlib import Path

from src.data.download import DatasetError, files_to_fetch, find_or_download, read_gz_verified
from src.data.idx import parse_idx
from src.data.source import ImageData

OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"

# sha256 of the *decompressed* IDX files: identical for the official .gz files and Debian's recompressed copies.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

FILES = tuple(CONTENT_SHA256)

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def idx_files_to_download(folder_name: str, root: str, system_dir: str | None, url: str | None) -> list[Path]:
    """The IDX files `load_idx_files` would download (none when there is no `url` to download from)."""
    download_dir = Path(root) / folder_name
    search = [download_dir] + ([Path(system_dir)] if system_dir else [])
    return files_to_fetch(FILES, search, download_dir) if url else []


def load_idx_files(
    folder_name: str,
    root: str,
    system_dir: str | None,
    url: str | None,
    checksums: dict[str, str] | None,
    how_to_get: str,
):
    """Load the four IDX files of an MNIST-format dataset as ((train_x, train_y), (test_x, test_y))."""
    download_dir = Path(root) / folder_name
    search = [download_dir] + ([Path(system_dir)] if system_dir else [])

    def load(filename):
        def verify(path):
            expected = None if checksums is None else checksums[filename]
            return parse_idx(read_gz_verified(path, expected), name=str(path))

        try:
            return find_or_download(filename, search, download_dir, url, verify)
        except DatasetError as err:
            raise DatasetError(f"{err}. {how_to_get}") from None

    train_x, train_y = load("train-images-idx3-ubyte.gz"), load("train-labels-idx1-ubyte.gz")
    test_x, test_y = load("t10k-images-idx3-ubyte.gz"), load("t10k-labels-idx1-ubyte.gz")
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if images.ndim != 3 or len(images) != len(labels):
            raise DatasetError(f"{folder_name} {split}: {tuple(images.shape)} images but {len(labels)} labels")
    return (train_x.unsqueeze(1), train_y.long()), (test_x.unsqueeze(1), test_y.long())


class FashionMNIST:
    """Source of Fashion-MNIST tensors; configured by `conf/dataset/split_fmnist.yaml`."""

    n_classes, input_shape = 10, (1, 28, 28)  # known before loading, for config checks

    def __init__(
        self,
        root: str,
        system_dir: str | None = "/usr/share/datasets/fashion-mnist",
        url: str | None = OFFICIAL_URL,
        verify_checksums: bool = True,
    ):
        self.root, self.system_dir, self.url, self.verify_checksums = root, system_dir, url, verify_checksums

    def files_to_download(self) -> list[Path]:
        return idx_files_to_download("fashion-mnist", self.root, self.system_dir, self.url)

    def load(self) -> ImageData:
        (train_x, train_y), (test_x, test_y) = load_idx_files(
            "fashion-mnist",
            self.root,
            self.system_dir,
            self.url,
            CONTENT_SHA256 if self.verify_checksums else None,
            how_to_get="Install Debian's package (apt-get install dataset-fashion-mnist) or put the four official "
            f".gz files from {OFFICIAL_URL} in {Path(self.root) / 'fashion-mnist'}",
        )
        return ImageData(
            train_x, train_y, test_x, test_y, n_classes=10, mean=(0.2860,), std=(0.3530,), class_names=CLASS_NAMES
        )
