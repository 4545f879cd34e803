"""Torch quantized tensors: their integer chunks turned into the values they stand for,
x = (q - zero_point) * scale, per tensor or per channel, in the walker's float64 buffer (so every
engine, the C kernel included, sees dequantized float64 values). numpy does it: the integers are
int8, uint8 or int32, and torch saves the per-channel scales as float64 and zero points as int64,
all types numpy has."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

from ckptscope.formats.array_views import NUMPY_DTYPES, logical_array
from ckptscope.formats.model import TensorInfo

from .walk import Buffers, Chunk, ViewPlan


def quantized_note(info: TensorInfo, plan: ViewPlan) -> str | None:
    """Why the values of a quantized tensor cannot be walked, if they cannot."""
    quant = info.quant
    if quant is not None and quant.scales is not None and not plan.dense:
        return "statistics are not computed for a non-contiguous view of a per-channel quantized tensor"
    if quant is not None and info.dtype not in NUMPY_DTYPES:
        return f"statistics are not computed for a quantized tensor stored as {info.dtype}"
    for params in (quant.scales, quant.zero_points) if quant is not None else ():
        if params is not None and params.dtype not in NUMPY_DTYPES:
            return f"statistics are not computed for a quantized tensor with {params.dtype} parameters"
    return None


def _parameters(mm: mmap.mmap, params: TensorInfo) -> np.ndarray:
    """A per-channel parameter tensor's values as float64."""
    raw = logical_array(mm, params).reshape(-1)
    return raw.view(NUMPY_DTYPES[params.dtype]).astype(np.float64)


def dequantized(mm: mmap.mmap, info: TensorInfo, chunks: Iterator[Chunk], bufs: Buffers) -> Iterator[Chunk]:
    """The chunks of the integer representation as float64 values (in ``bufs.raw_f64``)."""
    quant = info.quant
    assert quant is not None
    ints = NUMPY_DTYPES[info.dtype]
    scales = zero_points = None
    step = channels = 1
    if quant.scales is not None and quant.zero_points is not None:
        scales = _parameters(mm, quant.scales)
        zero_points = _parameters(mm, quant.zero_points)
        # a dense walk visits the storage run in order: the element at run position p lies in
        # channel (p // stride[axis]) % channels, whatever the order of the other dimensions
        step = info.stride[quant.axis] if info.shape[quant.axis] > 1 else 1
        channels = info.shape[quant.axis]
    done = 0
    for chunk in chunks:
        n = chunk.n
        values = np.frombuffer(bufs.raw_f64, dtype=np.float64, count=n)
        np.copyto(values, np.frombuffer(chunk.buffer, dtype=ints, count=n), casting="unsafe")
        if scales is None or zero_points is None:
            values -= quant.zero_point
            values *= quant.scale
        else:
            channel = np.arange(done, done + n, dtype=np.int64) // step % channels
            values -= zero_points[channel]
            values *= scales[channel]
        done += n
        del values
        with memoryview(bufs.raw_f64) as whole, whole[: n * 8] as view:
            yield Chunk(view, n, "float64")
