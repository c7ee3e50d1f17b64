"""Downloading, checking, extracting and parsing MNIST and CIFAR, from official-format files on a loopback server."""

import gzip
import hashlib
import io
import os
import pickle
import tarfile

import pytest
import torch

from src.data.cifar import CIFAR10, CIFAR100
from src.data.download import DatasetError, md5_file, verify_md5
from src.data.mnist import MNIST, OFFICIAL_MD5
from tests.fake_datasets import FileServer, cifar10_archive, cifar100_archive, coarse_of, md5, mnist_files, write

CIFAR10_NAME, CIFAR100_NAME = "cifar-10-python.tar.gz", "cifar-100-python.tar.gz"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def archives():
    return {CIFAR10_NAME: cifar10_archive(), CIFAR100_NAME: cifar100_archive()}


@pytest.fixture
def server(archives):
    srv = FileServer(archives)
    yield srv
    srv.close()


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# ---- the generic md5 check ----------------------------------------------------------------------------------------
def test_md5_of_a_whole_file_and_its_check(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(3_000_000)  # more than one read chunk
    path.write_bytes(data)
    assert md5_file(path) == hashlib.md5(data).hexdigest()
    assert verify_md5(path, hashlib.md5(data).hexdigest().upper()) == path
    assert verify_md5(path, None) == path
    with pytest.raises(DatasetError) as err:
        verify_md5(path, "0" * 32)
    assert "checksum mismatch" in one_line(err) and str(path) in str(err.value)


# ---- CIFAR --------------------------------------------------------------------------------------------------------
def test_cifar10_is_downloaded_checked_extracted_parsed_and_then_reused(tmp_path, server, archives):
    source = CIFAR10(root=str(tmp_path), url=server.url, md5=md5(archives[CIFAR10_NAME]))
    data = source.load()
    assert server.requests == [f"/files/{CIFAR10_NAME}"]
    assert data.train_x.shape == (100, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (30, 3, 32, 32) and data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == torch.int64 and data.train_y.bincount().tolist() == [10] * 10
    assert data.test_y.bincount().tolist() == [3] * 10
    assert data.n_classes == 10 and data.input_shape == (3, 32, 32) and data.class_names[0] == "airplane"
    assert len(data.mean) == len(data.std) == 3
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file() and (tmp_path / CIFAR10_NAME).is_file()
    # pixel layout: the first row of the first batch is channel-major (1024 red, 1024 green, 1024 blue)
    with tarfile.open(fileobj=io.BytesIO(archives[CIFAR10_NAME])) as tar:
        first = pickle.load(tar.extractfile("cifar-10-batches-py/data_batch_1"))
    assert data.train_x[0, 1].flatten().tolist() == first["data"][0, 1024:2048].tolist()
    assert data.train_y[: len(first["labels"])].tolist() == first["labels"]
    server.requests.clear()
    again = CIFAR10(root=str(tmp_path), url=server.url, md5=md5(archives[CIFAR10_NAME])).load()
    assert server.requests == []  # the second run finds the extracted folder
    assert torch.equal(again.train_x, data.train_x)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cifar100_uses_the_fine_labels(tmp_path, server, archives):
    data = CIFAR100(root=str(tmp_path), url=server.url, md5=md5(archives[CIFAR100_NAME])).load()
    assert data.n_classes == 100 and data.train_x.shape == (500, 3, 32, 32) and data.test_x.shape == (200, 3, 32, 32)
    assert data.train_y.bincount().tolist() == [5] * 100 and data.test_y.bincount().tolist() == [2] * 100
    with tarfile.open(fileobj=io.BytesIO(archives[CIFAR100_NAME])) as tar:
        train = pickle.load(tar.extractfile("cifar-100-python/train"))
    assert data.train_y.tolist() == train["fine_labels"] != train["coarse_labels"]
    assert data.train_y.max() == 99 and torch.equal(torch.as_tensor(train["coarse_labels"]), coarse_of(data.train_y))
    assert data.class_names[:2] == ("fine_0", "fine_1")


def test_truncated_archive_is_reported_in_one_line_removed_and_fetched_again(tmp_path, server, archives):
    good = archives[CIFAR10_NAME]
    server.files[CIFAR10_NAME] = good[: len(good) // 2]
    source = CIFAR10(root=str(tmp_path), url=server.url, md5=md5(good))
    with pytest.raises(DatasetError) as err:
        source.load()
    message = one_line(err)
    assert "checksum mismatch" in message and CIFAR10_NAME in message and "next run downloads it again" in message
    assert not (tmp_path / CIFAR10_NAME).exists() and not (tmp_path / "cifar-10-batches-py").exists()
    server.files[CIFAR10_NAME] = good
    server.requests.clear()
    assert source.load().train_x.shape == (100, 3, 32, 32)
    assert server.requests == [f"/files/{CIFAR10_NAME}"]


def test_a_corrupt_archive_left_in_the_data_folder_is_replaced(tmp_path, server, archives):
    (tmp_path / CIFAR10_NAME).write_bytes(b"not an archive")
    data = CIFAR10(root=str(tmp_path), url=server.url, md5=md5(archives[CIFAR10_NAME])).load()
    assert data.train_y.shape == (100,) and server.requests == [f"/files/{CIFAR10_NAME}"]


def test_an_archive_already_in_the_data_folder_is_used_without_download(tmp_path, archives):
    write(tmp_path, {CIFAR100_NAME: archives[CIFAR100_NAME]})
    data = CIFAR100(root=str(tmp_path), url=None, md5=md5(archives[CIFAR100_NAME])).load()
    assert data.train_y.shape == (500,)


def test_the_official_checksum_is_the_default(tmp_path, server):
    assert CIFAR10(root=str(tmp_path)).md5 == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR100(root=str(tmp_path)).md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    with pytest.raises(DatasetError) as err:  # a generated archive is not the official one
        CIFAR100(root=str(tmp_path), url=server.url).load()
    assert "eb9058c3a382ffc7106e4002c42a8d85" in one_line(err)
    data = CIFAR100(root=str(tmp_path), url=server.url, verify_checksums=False).load()
    assert data.n_classes == 100


def test_offline_and_missing_says_where_it_looked_and_what_to_fetch(tmp_path):
    with pytest.raises(DatasetError) as err:
        CIFAR100(root=str(tmp_path), url="http://127.0.0.1:9").load()
    message = one_line(err)
    assert str(tmp_path) in message and "cifar-100-python" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message


def test_archive_members_outside_the_folder_are_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "data"
    write(root, {CIFAR10_NAME: buffer.getvalue()})
    with pytest.raises(DatasetError) as err:
        CIFAR10(root=str(root), url=None, verify_checksums=False).load()
    assert "unexpected member" in one_line(err)
    assert not (tmp_path / "escaped.txt").exists() and not (root / CIFAR10_NAME).exists()


def test_a_batch_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = write(tmp_path / "cifar-10-batches-py", {n: b"" for n in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]})
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(DatasetError) as err:
        CIFAR10(root=str(tmp_path), url=None).load()
    assert "not allowed" in one_line(err) and "system" in str(err.value)


# ---- MNIST --------------------------------------------------------------------------------------------------------
def test_mnist_download_check_parse_reuse_and_recovery(tmp_path):
    files = mnist_files()
    checksums = {name: md5(data) for name, data in files.items()}
    server = FileServer({**files, "train-images-idx3-ubyte.gz": files["train-images-idx3-ubyte.gz"][:100]})
    try:
        source = MNIST(root=str(tmp_path), url=server.url, md5=checksums)
        with pytest.raises(DatasetError) as err:
            source.load()
        assert "checksum mismatch" in one_line(err) and "train-images-idx3-ubyte.gz" in str(err.value)
        assert not (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").exists()
        server.files.update(files)
        server.requests.clear()
        data = source.load()
        assert server.requests == ["/files/train-images-idx3-ubyte.gz", "/files/train-labels-idx1-ubyte.gz",
                                   "/files/t10k-images-idx3-ubyte.gz", "/files/t10k-labels-idx1-ubyte.gz"]
        assert data.train_x.shape == (60, 1, 28, 28) and data.train_x.dtype == torch.uint8
        assert data.test_x.shape == (20, 1, 28, 28) and sorted(set(data.train_y.tolist())) == list(range(10))
        server.requests.clear()
        MNIST(root=str(tmp_path), url=server.url, md5=checksums).load()
        assert server.requests == []
    finally:
        server.close()


def test_mnist_official_checksums_and_offline_message(tmp_path):
    assert MNIST(root=str(tmp_path)).md5 == OFFICIAL_MD5
    with pytest.raises(DatasetError) as err:
        MNIST(root=str(tmp_path), url="http://127.0.0.1:9").load()
    message = one_line(err)
    assert str(tmp_path / "mnist") in message and "ossci-datasets.s3.amazonaws.com/mnist" in message


# ---- a broken copy in the data folder is reported even when a good copy elsewhere is used ---------------------------
@pytest.mark.parametrize("damage, reason", [(lambda data: data[: len(data) // 2], "checksum mismatch"),
                                            (lambda data: b"garbage", "checksum mismatch")])
def test_a_bad_file_in_the_data_folder_is_reported_when_the_system_copy_is_used(tmp_path, caplog, damage, reason):
    files = mnist_files()
    checksums = {name: md5(data) for name, data in files.items()}
    system = write(tmp_path / "system", files)
    mine = tmp_path / "data" / "mnist"
    write(mine, files)
    bad = mine / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(damage(files[bad.name]))
    with caplog.at_level("WARNING", logger="src.data.download"):
        data = MNIST(root=str(tmp_path / "data"), system_dir=str(system), url=None, md5=checksums).load()
    assert data.train_y.shape == (60,)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{bad}: {reason}") and warnings[0].endswith(f"using {system / bad.name} instead")
    assert bad.read_bytes() == damage(files[bad.name])  # the user's file is left for the user to deal with


def test_a_wrong_file_in_the_data_folder_is_reported_for_fashion_mnist_too(tmp_path, caplog):
    """Content checksums (Fashion-MNIST's): an MNIST file put where the Fashion-MNIST one belongs."""
    from src.data.fashion_mnist import CONTENT_SHA256, load_idx_files

    mnist = mnist_files()
    system = write(tmp_path / "system", mnist)
    mine = write(tmp_path / "data" / "fashion-mnist", {"t10k-labels-idx1-ubyte.gz": mnist["train-labels-idx1-ubyte.gz"]})
    sums = {name: hashlib.sha256(gzip.decompress(data)).hexdigest() for name, data in mnist.items()}
    assert set(sums) == set(CONTENT_SHA256)
    with caplog.at_level("WARNING", logger="src.data.download"):
        load_idx_files("fashion-mnist", str(tmp_path / "data"), str(system), None, sums, how_to_get="")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{mine / 't10k-labels-idx1-ubyte.gz'}: checksum mismatch (sha256 of content")
    assert warning.endswith(f"using {system / 't10k-labels-idx1-ubyte.gz'} instead")
