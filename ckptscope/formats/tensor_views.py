"""Tensor views over a memory-mapped file, walked in bounded row blocks (imports torch).

Used by the stats engine, the writers (casts and non-row-major views) and the comparer; the
readers themselves never import this module, so listing stays torch-free.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import torch

from .model import TensorInfo


def storage_tensor(mm: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    """The tensor's whole storage as a 1-D tensor of its dtype, zero-copy."""
    return torch.frombuffer(
        mm, dtype=getattr(torch, info.dtype), count=info.storage.nbytes // info.itemsize, offset=info.storage.offset
    )


def logical_view(mm: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    """The tensor as saved (shape, stride, offset into its storage); 0-d tensors as one element."""
    return storage_tensor(mm, info).as_strided(info.shape or (1,), info.stride or (1,), info.storage_offset)


def row_blocks(view: torch.Tensor, max_elements: int) -> Iterator[torch.Tensor]:
    """Consecutive slices along dim 0 of at most ``max_elements`` each (at least one row). Views of
    the same shape are cut at the same rows, so two of them can be walked side by side."""
    rows = view.shape[0]
    per_row = max(1, view.numel() // max(rows, 1))
    step = max(1, max_elements // per_row)
    for i in range(0, rows, step):
        yield view[i : i + step]
