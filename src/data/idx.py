"""Parser for the IDX format of (Fashion-)MNIST: a big-endian header, then raw uint8 values."""

from __future__ import annotations

import struct

import numpy as np
import torch

from src.data.download import DatasetError


def parse_idx(data: bytes, name: str = "IDX file") -> torch.Tensor:
    """Parse IDX bytes into a uint8 tensor with the shape the header declares."""
    if len(data) < 4:
        raise DatasetError(f"{name}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{name}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise DatasetError(f"{name}: header says {dims} ({expected} bytes) but holds {len(data) - header} bytes")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def write_idx(tensor: torch.Tensor) -> bytes:
    """The inverse of `parse_idx`; used by the tests to make files in the official format."""
    array = tensor.numpy().astype(np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()
