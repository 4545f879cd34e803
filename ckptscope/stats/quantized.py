"""Torch quantized tensors: their integer chunks turned into the values they stand for,
x = (q - zero_point) * scale, per tensor or per channel, in place in the walker's float64 buffer
(so every engine, the C kernel included, sees dequantized values)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import torch

from ckptscope.formats.model import TensorInfo
from ckptscope.formats.tensor_views import logical_view

from .walk import Chunk, ViewPlan


def quantized_note(info: TensorInfo, plan: ViewPlan) -> str | None:
    """Why the values of a quantized tensor cannot be walked, if they cannot."""
    quant = info.quant
    if quant is not None and quant.scales is not None and not plan.dense:
        return "statistics are not computed for a non-contiguous view of a per-channel quantized tensor"
    return None


def dequantized(mm: mmap.mmap, info: TensorInfo, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The chunks of the integer representation, dequantized in place (chunks of integer tensors
    are always written to the walker's own float64 buffer, never read in place)."""
    quant = info.quant
    assert quant is not None
    if quant.scales is None or quant.zero_points is None:
        for chunk in chunks:
            chunk.values.sub_(quant.zero_point).mul_(quant.scale)
            yield chunk
        return
    scales = logical_view(mm, quant.scales).to(torch.float64)
    zero_points = logical_view(mm, quant.zero_points).to(torch.float64)
    # a dense walk visits the storage run in order: the element at run position p lies in channel
    # (p // stride[axis]) % channels, whatever the order of the other dimensions
    step = info.stride[quant.axis] if info.shape[quant.axis] > 1 else 1
    channels = info.shape[quant.axis]
    done = 0
    for chunk in chunks:
        n = chunk.values.numel()
        channel = torch.arange(done, done + n, dtype=torch.int64).div_(step, rounding_mode="floor").remainder_(channels)
        chunk.values.sub_(zero_points[channel]).mul_(scales[channel])
        done += n
        yield chunk
