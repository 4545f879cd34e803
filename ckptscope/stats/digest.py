"""Content digests: ``xxh3-128`` of a tensor's dtype, shape and logical bytes in C order, so the same
tensor has the same digest in any file, format or layout (a transposed view hashes its values in
row-major order, not its storage's order).

xxh3 is a fast non-cryptographic hash (tens of GB/s): it is computed in the stats pass over bytes
the pass reads anyway. It identifies content for comparison (which tensors and modules are
identical to which); it is not a security boundary against someone who crafts collisions on
purpose: a copy is verified against the bytes it wrote, not only their digests.

What is hashed after the header: a plain tensor's elements in its own dtype; a stitched tensor's
(torch.distributed.checkpoint) elements assembled in C order; a torch quantized tensor's
dequantized float32 values (its scheme and parameters are in the header); a GGUF-encoded tensor's
blocks as stored (its type is in the header).

The logical bytes of a view that is not one C-order byte range (a transposed or expanded view, a
stitched or a quantized tensor) are assembled with numpy (``formats/array_views.py``), never torch:
they are the bits torch would give, so the digest does not depend on which did it.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import xxhash

from ckptscope.formats.array_views import NUMPY_DTYPES, logical_array, raw_dtype, row_blocks
from ckptscope.formats.model import TensorInfo, contiguous_stride

PREFIX = "xxh3-128:"
READ_BYTES = 1 << 20


def is_digest(text: str) -> bool:
    """Whether ``text`` is a digest as ``TensorStats.digest`` spells it."""
    hexpart = text[len(PREFIX) :]
    return text.startswith(PREFIX) and len(hexpart) == 32 and all(c in "0123456789abcdef" for c in hexpart)


def header(info: TensorInfo) -> bytes:
    quant = None if info.quant is None else json.dumps(info.quant.describe(), sort_keys=True)
    return _header(info.dtype, info.shown_dtype, info.shape, quant, info.encoding)


@lru_cache(maxsize=4096)
def _header(dtype: str, shown_dtype: str, shape: tuple[int, ...], quant: str | None, encoding: str | None) -> bytes:
    # the element type: a file's own name for it only where the bytes are not plain elements (a
    # GGUF F32 tensor is float32 like any other; a Q4_K one is its blocks)
    element = dtype if encoding is None and quant is None else shown_dtype
    parts: dict[str, object] = {"dtype": element, "shape": list(shape)}
    if quant is not None:
        parts["quantization"] = json.loads(quant)
    if encoding is not None:
        parts["encoding"] = encoding
    return b"ckptscope-tensor-1\0" + json.dumps(parts, sort_keys=True, separators=(",", ":")).encode() + b"\0"


def new_digester(info: TensorInfo) -> xxhash.xxh3_128:
    digester = xxhash.xxh3_128()
    digester.update(header(info))
    return digester


def finish(digester: xxhash.xxh3_128) -> str:
    return PREFIX + digester.hexdigest()


def digest_of_bytes(info: TensorInfo, data: bytes | memoryview) -> str:
    """The digest of a tensor whose logical bytes are ``data`` (a plain C-order range)."""
    digester = new_digester(info)
    digester.update(data)
    return finish(digester)


def tensor_digest(info: TensorInfo) -> str:
    """The digest of one tensor, reading its bytes (outside a stats pass)."""
    digester = new_digester(info)
    for part in _logical_bytes(info):
        digester.update(part)
    return finish(digester)


@contextmanager
def _mapped(path: str) -> Iterator[mmap.mmap]:
    """A read-only mapping of ``path``, closed after (left to the GC while an array still views it)."""
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        try:
            mm.close()
        except BufferError:
            pass


def _logical_bytes(info: TensorInfo) -> Iterator[bytes | memoryview]:
    if info.numel == 0:
        return
    if info.encoding is not None:  # the blocks as stored
        if info.storage.nbytes == 0:
            return
        with _mapped(info.storage.path) as mm:
            start, end = info.storage.offset, info.storage.offset + info.storage.nbytes
            for at in range(start, end, READ_BYTES):
                yield bytes(mm[at : min(at + READ_BYTES, end)])
        return
    if info.pieces:
        yield from _stitched_bytes(info)
        return
    if info.quant is not None:
        yield from _dequantized_bytes(info)
        return
    with _mapped(info.storage.path) as mm:
        if info.numel <= 1 or info.stride == contiguous_stride(info.shape):  # one C-order byte range
            for at in range(info.data_offset, info.data_offset + info.nbytes, READ_BYTES):
                yield bytes(mm[at : min(at + READ_BYTES, info.data_offset + info.nbytes)])
            return
        view = logical_array(mm, info)
        for block in row_blocks(view, READ_BYTES // info.itemsize):
            yield np.ascontiguousarray(block).tobytes()
        del view, block


def _stitched_bytes(info: TensorInfo) -> Iterator[bytes]:
    """A stitched tensor assembled in memory (its raw elements), each piece copied into its slice."""
    full = np.empty(info.shape, dtype=raw_dtype(info.itemsize))
    for piece in info.pieces:
        part = piece.info
        if part.numel == 0:
            continue
        with _mapped(part.storage.path) as mm:
            view = logical_array(mm, part).reshape(part.shape)
            full[tuple(slice(o, o + n) for o, n in zip(piece.offsets, part.shape, strict=True))] = view
            del view
    data = full.reshape(-1).view(np.uint8)
    for at in range(0, data.size, READ_BYTES):
        yield data[at : at + READ_BYTES].tobytes()


def _dequantized_bytes(info: TensorInfo) -> Iterator[bytes]:
    """A torch quantized tensor's values, (q - zero_point) * scale computed in float64 and stored
    as float32, in row blocks."""
    quant = info.quant
    assert quant is not None
    ints = NUMPY_DTYPES[info.dtype]
    with _mapped(info.storage.path) as mm:
        view = logical_array(mm, info).reshape(info.shape or (1,)).view(ints)
        scales = zero_points = None
        if quant.scales is not None and quant.zero_points is not None:
            shape = [1] * view.ndim
            shape[quant.axis] = -1
            scales = _float64(mm, quant.scales).reshape(shape)
            zero_points = _float64(mm, quant.zero_points).reshape(shape)
        row = 0
        for block in _whole_rows(view, READ_BYTES // 8):
            values = block.astype(np.float64)
            if scales is None or zero_points is None:
                values = (values - quant.zero_point) * quant.scale
            elif quant.axis == 0:
                rows = slice(row, row + block.shape[0])
                values = (values - zero_points[rows]) * scales[rows]
            else:
                values = (values - zero_points) * scales
            row += block.shape[0]
            yield values.astype(np.float32).tobytes()
        del view


def _whole_rows(view: np.ndarray, max_elements: int) -> Iterator[np.ndarray]:
    """Slices along dim 0 of about ``max_elements`` (at least one row), so per-channel parameters
    broadcast against every block alike."""
    per_row = max(1, view.size // max(view.shape[0], 1))
    step = max(1, max_elements // per_row)
    for i in range(0, view.shape[0], step):
        yield view[i : i + step]


def _float64(mm: mmap.mmap, params: TensorInfo) -> np.ndarray:
    return logical_array(mm, params).reshape(-1).view(NUMPY_DTYPES[params.dtype]).astype(np.float64)
