"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50,000 training and 10,000 test colour 32×32 images.

The official "python version" archives are used: `cifar-10-python.tar.gz` (folder `cifar-10-batches-py`) and
`cifar-100-python.tar.gz` (folder `cifar-100-python`), the same layout torchvision uses, so a `root` shared with
torchvision works. On `load()`:

1. if `<root>/<folder>` holds every batch file, it is parsed and nothing is downloaded;
2. else the archive is looked for in `<root>` and downloaded from `url` if missing, and its md5 is checked against
   the official one — a truncated or corrupt archive is reported in one line and removed, so the next run fetches
   it again;
3. the archive is extracted (members checked, tarfile's "data" filter) into a temporary folder that is renamed to
   `<root>/<folder>` only when complete, so an interrupted extraction never looks finished.

The batches are Python pickles. They are read with an unpickler that only allows numpy arrays, so a tampered file
cannot run code. Images become one uint8 N×3×32×32 tensor; CIFAR-100 uses its 100 *fine* labels.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from src.data.download import DatasetError, files_to_fetch, find_or_download, verify_md5
from src.data.source import ImageData

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def read_batch(path: Path) -> dict:
    """One pickled CIFAR batch as a dict with str keys (latin1 decodes the Python 2 pickles of the archives)."""
    try:
        with open(path, "rb") as stream:
            batch = _ArraysOnly(stream, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise DatasetError(f"{path}: not a CIFAR batch file ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR batch file (holds a {type(batch).__name__}, not a dict)")
    return batch


class _CIFAR:
    archive: str
    folder: str
    official_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape = (3, 32, 32)  # known before loading (with n_classes), for config checks

    def __init__(self, root: str, url: str | None = OFFICIAL_URL, md5: str | None = None, verify_checksums: bool = True):
        """`md5`: the expected md5 of the archive (default: the official one); `verify_checksums=False` skips it."""
        self.root, self.url = Path(root), url
        self.md5 = (md5 or self.official_md5) if verify_checksums else None

    @property
    def folder_path(self) -> Path:
        return self.root / self.folder

    def _how_to_get(self) -> str:
        return (f"A bad archive in {self.root} is removed, so the next run downloads it again; or fetch "
                f"{OFFICIAL_URL}/{self.archive} into {self.root} (or its extracted {self.folder}/ folder)")

    def _complete(self) -> bool:
        return all((self.folder_path / name).is_file() for name in (*self.train_files, *self.test_files))

    def files_to_download(self) -> list[Path]:
        """What `load()` would write into `root` (a stat each, for the config check): the archive when it must be
        downloaded, else the folder extracted from it when that is incomplete."""
        if self._complete():
            return []
        if not files_to_fetch([self.archive], [self.root], self.root):
            return [self.folder_path]
        return [self.root / self.archive] if self.url else []

    def _fetch_and_extract(self) -> None:
        try:
            archive = find_or_download(self.archive, [self.root], self.root, self.url,
                                       lambda path: verify_md5(path, self.md5))
        except DatasetError as err:
            raise DatasetError(f"{self.folder}/ not found in {self.root}; {err}. {self._how_to_get()}") from None
        self._extract(archive)

    def _extract(self, archive: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder}-", dir=self.root))
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    inside = member.name == self.folder or member.name.startswith(self.folder + "/")
                    if not inside or ".." in Path(member.name).parts or not (member.isfile() or member.isdir()):
                        raise tarfile.TarError(f"unexpected member {member.name!r}")
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python < 3.10.12: the members were checked above
                    tar.extractall(tmp)  # noqa: S202
            if self.folder_path.exists():  # an incomplete earlier copy
                shutil.rmtree(self.folder_path)
            os.replace(tmp / self.folder, self.folder_path)
        except (tarfile.TarError, OSError, EOFError) as err:
            if archive.parent.resolve() == self.root.resolve():
                archive.unlink(missing_ok=True)
            raise DatasetError(
                f"{archive}: cannot be extracted ({type(err).__name__}: {err}); removed, run again to download it again"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _parse(self, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in files:
            path = self.folder_path / name
            batch = read_batch(path)
            if "data" not in batch or self.label_key not in batch:
                raise DatasetError(f"{path}: no 'data' or '{self.label_key}' entry; delete {self.folder_path} and run again")
            data = np.asarray(batch["data"])
            y = np.asarray(batch[self.label_key], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(y) != len(data):
                raise DatasetError(f"{path}: data {data.dtype}{list(data.shape)} with {len(y)} labels is not "
                                   f"N×3072 uint8 images with N labels; delete {self.folder_path} and run again")
            if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
                raise DatasetError(f"{path}: labels outside [0, {self.n_classes})")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are channel-major: 1024 red, 1024 green, 1024 blue
            labels.append(y)
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    def _class_names(self) -> tuple[str, ...]:
        path = self.folder_path / self.meta_file
        if not path.is_file():
            return ()
        names = read_batch(path).get(self.names_key, [])
        return tuple(str(n) for n in names) if len(names) == self.n_classes else ()

    def load(self) -> ImageData:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._complete():
            self._fetch_and_extract()
            if not self._complete():
                missing = [n for n in (*self.train_files, *self.test_files) if not (self.folder_path / n).is_file()]
                raise DatasetError(f"{self.archive} extracted to {self.folder_path} lacks {', '.join(missing)}")
        train_x, train_y = self._parse(self.train_files)
        test_x, test_y = self._parse(self.test_files)
        return ImageData(train_x, train_y, test_x, test_y, self.n_classes, self.mean, self.std, self._class_names())


class CIFAR10(_CIFAR):
    """CIFAR-10: 10 classes; configured by `conf/dataset/split_cifar10.yaml`."""

    archive, folder = "cifar-10-python.tar.gz", "cifar-10-batches-py"
    official_md5 = "c58f30108f718f92721af3b95e74349a"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file, label_key, names_key, n_classes = "batches.meta", "labels", "label_names", 10
    # per-channel statistics of the official training images
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100(_CIFAR):
    """CIFAR-100 with its 100 fine labels; configured by `conf/dataset/split_cifar100.yaml`."""

    archive, folder = "cifar-100-python.tar.gz", "cifar-100-python"
    official_md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    train_files, test_files = ("train",), ("test",)
    meta_file, label_key, names_key, n_classes = "meta", "fine_labels", "fine_label_names", 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
