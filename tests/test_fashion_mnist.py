"""Fashion-MNIST files: the IDX parser, Debian's copies, official-format downloads from a loopback server,
checksum failures and recovery, and the offline message."""

import gzip
import http.server
import threading
from pathlib import Path

import pytest
import torch

from src.data.download import DatasetError
from src.data.fashion_mnist import CONTENT_SHA256, FashionMNIST
from src.data.idx import parse_idx, write_idx
from tests.helpers import FMNIST_SYSTEM_DIR, run_train

FILES = list(CONTENT_SHA256)
needs_fmnist = pytest.mark.skipif(not FMNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed")


def test_idx_roundtrip_and_errors():
    t = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(parse_idx(write_idx(t)), t)
    with pytest.raises(DatasetError, match="holds"):
        parse_idx(write_idx(t)[:-1])
    with pytest.raises(DatasetError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8)


class Server:
    """Serves files from a folder on 127.0.0.1 and counts the requests."""

    def __init__(self, folder: Path):
        self.requests = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def official_format(tmp_path_factory):
    """The real data recompressed as a fresh official-style .gz (other archive bytes than Debian's, same content)."""
    if not FMNIST_SYSTEM_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    folder = tmp_path_factory.mktemp("official")
    for name in FILES:
        content = gzip.decompress((FMNIST_SYSTEM_DIR / name).read_bytes())
        (folder / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    server = Server(folder)
    yield folder, server
    server.close()


@needs_fmnist
def test_debian_copy_is_found_and_verified(tmp_path):
    data = FashionMNIST(root=str(tmp_path), system_dir=str(FMNIST_SYSTEM_DIR), url=None).load()
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.bincount().tolist() == [6000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10
    assert not any(tmp_path.iterdir())  # nothing downloaded


@needs_fmnist
def test_download_from_official_format_files_then_reuse(tmp_path, official_format):
    folder, server = official_format
    assert (folder / FILES[0]).read_bytes() != (FMNIST_SYSTEM_DIR / FILES[0]).read_bytes()
    server.requests.clear()
    source = FashionMNIST(root=str(tmp_path), system_dir=None, url=server.url)
    downloaded = source.load()
    assert sorted(p.rsplit("/", 1)[-1] for p in server.requests) == sorted(FILES)
    debian = FashionMNIST(root=str(tmp_path / "x"), system_dir=str(FMNIST_SYSTEM_DIR), url=None).load()
    assert torch.equal(downloaded.train_x, debian.train_x) and torch.equal(downloaded.test_y, debian.test_y)
    server.requests.clear()
    source.load()
    assert server.requests == []  # the second run finds the files


@needs_fmnist
def test_corrupt_download_is_detected_removed_and_fetched_again(tmp_path, official_format):
    folder, server = official_format
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    for name in FILES:  # a truncated archive and a wrong-content archive
        good = (folder / name).read_bytes()
        bad = good[: len(good) // 2] if "images" in name else gzip.compress(b"\x00" * 100)
        (bad_folder / name).write_bytes(bad)
    bad_server = Server(bad_folder)
    try:
        with pytest.raises(DatasetError) as err:
            FashionMNIST(root=str(tmp_path / "data"), system_dir=None, url=bad_server.url).load()
    finally:
        bad_server.close()
    message = str(err.value)
    assert "\n" not in message and ("gzip" in message or "checksum" in message)
    assert not any((tmp_path / "data" / "fashion-mnist").iterdir())  # the bad download was removed
    data = FashionMNIST(root=str(tmp_path / "data"), system_dir=None, url=server.url).load()
    assert data.train_x.shape == (60000, 1, 28, 28)


@needs_fmnist
def test_a_corrupt_file_left_in_the_data_folder_is_replaced(tmp_path, official_format):
    _, server = official_format
    target = tmp_path / "fashion-mnist"
    target.mkdir()
    (target / FILES[1]).write_bytes(b"garbage")
    data = FashionMNIST(root=str(tmp_path), system_dir=None, url=server.url).load()
    assert data.train_y.shape == (60000,)


def test_offline_and_missing_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DatasetError) as err:
        FashionMNIST(root=str(tmp_path), system_dir=str(tmp_path / "nowhere"), url="http://127.0.0.1:9").load()
    message = str(err.value)
    assert str(tmp_path / "fashion-mnist") in message and "nowhere" in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def test_missing_data_through_the_cli_is_one_clear_line(tmp_path):
    proc = run_train(tmp_path / "run", f"paths.data_dir={tmp_path}", "dataset.source.system_dir=null",
                     "dataset.source.url=http://127.0.0.1:9", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train-images-idx3-ubyte.gz not found") and "Traceback" not in proc.stderr
