"""Small dataset files in the exact official formats, and a loopback HTTP server to download them from.

No dataset host is reachable from the tests, so they make their own: the four IDX `.gz` files of MNIST, and the
`cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` archives holding the pickled batches (`data`: N×3072 uint8
rows, channel-major; `labels`, or `fine_labels` + `coarse_labels`; a meta file with the class names).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from src.data.idx import write_idx


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class FileServer:
    """Serves `files` (name → bytes, mutable while running) at `url`; `requests` lists the paths asked for."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = dict(files or {})
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- MNIST --------------------------------------------------------------------------------------------------------
def mnist_files(per_class_train: int = 6, per_class_test: int = 2, seed: int = 0) -> dict[str, bytes]:
    """The four MNIST .gz files with 10 classes of random 28×28 digits."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = torch.arange(10, dtype=torch.uint8).repeat(per_class)
        images = torch.randint(0, 256, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
        out[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(write_idx(images), mtime=0)
        out[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(write_idx(labels), mtime=0)
    return out


# ---- CIFAR --------------------------------------------------------------------------------------------------------
def _images(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folders = sorted({name.split("/")[0] for name in members})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar10_archive(per_class_per_batch: int = 2, per_class_test: int = 3, seed: int = 0) -> bytes:
    """`cifar-10-python.tar.gz`: 5 training batches and a test batch, labels 0–9 (listed as Python ints)."""
    rng = np.random.default_rng(seed)
    members = {}
    for name, per_class in [(f"data_batch_{i}", per_class_per_batch) for i in range(1, 6)] + [("test_batch", per_class_test)]:
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        batch = {"batch_label": name, "labels": labels, "data": _images(len(labels), rng),
                 "filenames": [f"img_{i}.png" for i in range(len(labels))]}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2)
    return _tar_gz(members)


def coarse_of(fine: np.ndarray) -> np.ndarray:
    """A made-up superclass per fine class (not fine // 5, so that mixing up the two label sets shows)."""
    return (fine * 7 + 3) % 20


def cifar100_archive(per_class_train: int = 5, per_class_test: int = 2, seed: int = 0) -> bytes:
    """`cifar-100-python.tar.gz`: `train` and `test` with 100 fine and 20 coarse labels, and `meta`."""
    rng = np.random.default_rng(seed)
    members = {}
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        batch = {"filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": name,
                 "fine_labels": fine.tolist(), "coarse_labels": coarse_of(fine).tolist(), "data": _images(len(fine), rng)}
        members[f"cifar-100-python/{name}"] = pickle.dumps(batch, protocol=2)
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)], "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    members["cifar-100-python/meta"] = pickle.dumps(meta, protocol=2)
    return _tar_gz(members)


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder
