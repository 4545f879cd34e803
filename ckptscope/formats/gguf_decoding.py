"""Decoding of encoded tensors (``TensorInfo.encoding``: a GGUF quantisation such as ``Q4_K``) into
float32 values, a whole number of blocks at a time.

The bytes are read zero-copy from the file mapping as a numpy view and decoded by
``gguf.quants.dequantize`` (numpy), llama.cpp's own reference decoders written for numpy. A tensor
is decoded in ranges of blocks of about ``max_values`` values, never whole, so memory stays
bounded whatever its size. gguf (and numpy) are imported on the first decode only.

Used by the stats walker (``walk.py``), the comparer and the writers (export of a quantised
tensor as float values).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from functools import cache
from typing import Any

from .gguf_format import GGML_TYPES_BY_NAME, GGMLType
from .model import TensorInfo


@cache
def _quant_type(encoding: str) -> Any:
    """gguf's ``GGMLQuantizationType`` for an encoding its numpy code can decode, else None."""
    ggml = GGML_TYPES_BY_NAME.get(encoding)
    if ggml is None or not ggml.encoded:
        return None
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = getattr(GGMLQuantizationType, encoding, None)
    if qtype is None or GGML_QUANT_SIZES.get(qtype) != (ggml.block_size, ggml.type_size):
        return None
    traits: dict[Any, Any] = quants._type_traits  # the types gguf.quants.dequantize knows
    return qtype if qtype in traits else None


def can_decode(encoding: str) -> bool:
    """Whether values of this encoding can be decoded here."""
    return _quant_type(encoding) is not None


def undecodable_note(info: TensorInfo) -> str | None:
    """Why an encoded tensor's values cannot be read, if they cannot."""
    if info.encoding is None or can_decode(info.encoding):
        return None
    if info.encoding == "meta":
        return "a meta-device tensor: the file records its dtype and shape, no values"
    return f"statistics are not computed for {info.encoding} tensors: ckptscope has no decoder for this encoding"


def block_type(info: TensorInfo) -> GGMLType:
    assert info.encoding is not None
    return GGML_TYPES_BY_NAME[info.encoding]


def block_ranges(info: TensorInfo, max_values: int) -> Iterator[tuple[int, int]]:
    """(first block, block count) ranges covering the tensor, each of at most ``max_values``
    values (at least one block)."""
    ggml = block_type(info)
    total = info.numel // ggml.block_size
    step = max(1, max_values // ggml.block_size)
    for first in range(0, total, step):
        yield first, min(step, total - first)


def decode_blocks(mm: mmap.mmap, info: TensorInfo, first: int, count: int) -> Any:
    """Blocks ``first .. first + count`` of the tensor as a new 1-D float32 numpy array of
    ``count * block_size`` values (read zero-copy from ``mm``, the mapping of its file)."""
    import numpy as np
    from gguf import quants

    qtype = _quant_type(info.encoding or "")
    if qtype is None:
        raise ValueError(undecodable_note(info))
    ggml = block_type(info)
    start = info.storage.offset + first * ggml.type_size
    nbytes = count * ggml.type_size
    if first < 0 or count < 0 or start + nbytes > info.storage.offset + info.storage.nbytes:
        raise ValueError(f"blocks {first}..{first + count} lie outside tensor {info.name!r}")
    raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
    with np.errstate(all="ignore"):  # NaN/Inf scales decode to NaN/Inf values: counted, not warned about
        values = quants.dequantize(raw, qtype).reshape(-1)
    del raw
    return values.astype(np.float32, copy=False)


def decoded_chunks(mm: mmap.mmap, info: TensorInfo, max_values: int) -> Iterator[Any]:
    """The tensor's values in storage (row-major) order as float32 numpy arrays of at most
    ``max_values`` values each (at least one block); each array is new, owned by the caller."""
    for first, count in block_ranges(info, max_values):
        yield decode_blocks(mm, info, first, count)


def decode_into(mm: mmap.mmap, info: TensorInfo, first: int, count: int, out: Any) -> int:
    """Decode blocks ``first .. first + count`` into the start of ``out`` (a writable buffer of
    float32 room, e.g. the walker's ``bytearray``); returns the number of values written."""
    import numpy as np

    values = decode_blocks(mm, info, first, count)
    n = int(values.size)
    np.copyto(np.frombuffer(out, dtype=np.float32, count=n), values)
    return n
