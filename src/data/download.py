"""Finding, downloading and verifying dataset files.

A file is looked for in a list of folders (the project's data folder first, then system copies such as Debian's
packages), and downloaded with torch's own downloader only when no folder has it. Every file is verified before it
is used; a corrupt download is removed so that the next try fetches it again.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path

from torch.hub import download_url_to_file

log = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt or unparsable. The message is one line meant for the user."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_gz_verified(path: Path, sha256_of_content: str | None) -> bytes:
    """Decompress `path` and check the decompressed bytes.

    We check the *content*, not the archive: repackaged copies (Debian recompresses the `.gz` files) have other
    archive checksums but the same data.
    """
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f"{path}: not a valid gzip file ({err}); delete it and run again to re-download") from err
    if sha256_of_content is not None and sha256_bytes(data) != sha256_of_content:
        raise DatasetError(
            f"{path}: checksum mismatch (sha256 of content {sha256_bytes(data)[:12]}…, expected "
            f"{sha256_of_content[:12]}…); delete it and run again to re-download"
        )
    return data


def find_or_download(
    filename: str,
    search_dirs: list[Path],
    download_dir: Path,
    base_url: str | None,
    verify,
):
    """Return `verify(path)` for the first folder holding a valid `filename`, downloading it if none does.

    `verify` parses and checks a file, raising DatasetError when it is bad. A bad file is reported (a warning when
    another folder has a good copy, else in the error) and left in place, except that one in `download_dir` is ours:
    it is deleted when it is about to be downloaded again. A bad fresh download is deleted before the error.
    """
    problems, ours = [], []
    for folder in search_dirs:
        path = Path(folder) / filename
        if _is_file(path):
            try:
                found = verify(path)
            except DatasetError as err:
                problems.append(str(err))
                if Path(folder).resolve() == Path(download_dir).resolve():
                    ours.append(path)
                continue
            for problem in problems:  # the user would otherwise never learn that their copy is broken
                log.warning("%s; using %s instead", problem, path)
            return found
    if base_url is None:
        looked = ", ".join(str(d) for d in search_dirs)
        extra = f" ({'; '.join(problems)})" if problems else ""
        raise DatasetError(f"{filename} not found in {looked}{extra}")
    for path in ours:  # our own earlier download: removed so that it is fetched again
        log.warning("%s: bad copy removed, downloading it again", path)
        os.remove(path)
    download_dir.mkdir(parents=True, exist_ok=True)
    target = download_dir / filename
    url = base_url.rstrip("/") + "/" + filename
    try:
        download_url_to_file(url, str(target), progress=True)
    except Exception as err:  # urllib raises many kinds; all mean the same thing to the user
        looked = ", ".join(str(d) for d in search_dirs)
        raise DatasetError(
            f"{filename} not found in {looked} and download from {url} failed ({type(err).__name__}: {err})"
        ) from err
    try:
        return verify(target)
    except DatasetError:
        os.remove(target)
        raise


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # an unreadable folder on the way: nothing usable there
        return False


def files_to_fetch(filenames, search_dirs: list[Path], download_dir: Path) -> list[Path]:
    """Where `find_or_download` would download each of `filenames` that no folder holds (a stat each; nothing is
    read), so that a data folder that cannot take them is refused before any loading starts."""
    return [Path(download_dir) / name for name in filenames
            if not any(_is_file(Path(folder) / name) for folder in search_dirs)]


def md5_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """md5 of a whole file, read in chunks (archives such as CIFAR's are too big to hash in one read)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str | None) -> Path:
    """Return `path` if its md5 is `expected` (None: no check), else raise a one-line DatasetError.

    For files whose official checksum is of the file itself (the MNIST .gz files, the CIFAR archives); a truncated
    download fails here.
    """
    if expected is not None:
        actual = md5_file(path)
        if actual != expected.lower():
            raise DatasetError(
                f"{path}: checksum mismatch (md5 {actual}, expected {expected}; truncated or corrupt download?)"
            )
    return path
