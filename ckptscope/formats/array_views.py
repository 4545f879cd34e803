"""Tensor views over a memory-mapped file as numpy arrays of their raw elements (no torch).

numpy has no bfloat16 or float8, so a view's elements are seen as unsigned integers of the same
width (``void`` for 16-byte elements): gathering a strided view, expanding a stride-0 one or
assembling a stitched tensor moves bits, never values, and the bytes come out exactly as torch
would give them. Used by the stats walker and the digests; the values themselves are converted by
the C kernel (``ckptscope/stats/_kernel.c``).

numpy's ``as_strided`` does not check bounds, so every view is checked against its storage here
before one is made: a hostile file's view can never reach outside its byte range.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .model import DTYPES, TensorInfo

_RAW: dict[int, np.dtype[np.generic]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}

NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(name) for name in DTYPES if name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2")
}
"""The dtypes numpy has itself (their values can be read as numbers without the kernel)."""


def raw_dtype(itemsize: int) -> np.dtype[np.generic]:
    """The numpy dtype that holds one element of ``itemsize`` bytes as bits."""
    return _RAW.get(itemsize) or np.dtype(f"V{itemsize}")


def storage_array(mm: mmap.mmap, info: TensorInfo) -> np.ndarray:
    """The tensor's whole storage as a 1-D array of raw elements, zero-copy (read-only)."""
    itemsize = info.itemsize
    count = info.storage.nbytes // itemsize
    return np.frombuffer(mm, dtype=raw_dtype(itemsize), count=count, offset=info.storage.offset)


def strided_array(storage: np.ndarray, start: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """``storage`` viewed with ``shape`` and element ``stride`` from element ``start``, after
    checking that every element of the view lies inside it (ValueError otherwise)."""
    if len(shape) != len(stride) or start < 0 or any(s < 0 for s in stride) or any(n < 0 for n in shape):
        raise ValueError("a tensor view with a negative size, stride or offset")
    if 0 not in shape:
        last = start + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        if last >= storage.size:
            raise ValueError("a tensor view reaches beyond the end of its storage")
    elif start > storage.size:
        raise ValueError("a tensor view starts beyond the end of its storage")
    base = storage[start:] if start < storage.size else storage[:0]
    itemsize = storage.itemsize
    return as_strided(base, shape=shape, strides=tuple(s * itemsize for s in stride), writeable=False)


def logical_array(mm: mmap.mmap, info: TensorInfo) -> np.ndarray:
    """The tensor as saved (shape, stride, offset into its storage); 0-d tensors as one element."""
    return strided_array(storage_array(mm, info), info.storage_offset, info.shape or (1,), info.stride or (1,))


def row_blocks(view: np.ndarray, max_elements: int) -> Iterator[np.ndarray]:
    """Consecutive sub-views of ``view`` that together are its elements in C order, each of at
    most ``max_elements`` (a row longer than that is cut into its own rows, down to 1-D slices)."""
    if view.size <= max_elements:
        if view.size:
            yield view
        return
    if view.ndim == 1:
        for i in range(0, view.shape[0], max_elements):
            yield view[i : i + max_elements]
        return
    rows = view.shape[0]
    per_row = view.size // rows
    if per_row > max_elements:
        for i in range(rows):
            yield from row_blocks(view[i], max_elements)
        return
    step = max_elements // per_row
    for i in range(0, rows, step):
        yield view[i : i + step]


def gather_into(block: np.ndarray, out: bytearray) -> memoryview:
    """The block's elements copied in C order to the start of ``out``; the bytes written."""
    n = block.size * block.itemsize
    target = np.frombuffer(out, dtype=block.dtype, count=block.size).reshape(block.shape)
    np.copyto(target, block)
    return memoryview(out)[:n]
