"""Element-wise comparison of two tensors of the same shape, chunked, in logical order."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from ckptscope.formats.model import DTYPES, TensorInfo
from ckptscope.formats.tensor_views import logical_view, row_blocks

CHUNK_ELEMENTS = 1 << 20


def _logical_chunks(stack: ExitStack, info: TensorInfo) -> Iterator[torch.Tensor]:
    fh = stack.enter_context(open(info.storage.path, "rb"))
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    stack.callback(mm.close)
    view = logical_view(mm, info)
    try:
        for block in row_blocks(view, CHUNK_ELEMENTS):
            yield block.reshape(-1)
    finally:
        del view


def compare(a: TensorInfo, b: TensorInfo) -> dict[str, Any]:
    """max |a-b|, ||a-b|| / ||a||, cosine similarity, and whether the values are identical
    (NaN equal to NaN). Non-finite differences are left out of the norms."""
    if a.shape != b.shape:
        raise ValueError("compare needs tensors of the same shape")
    if a.view_key == b.view_key or a.numel == 0:
        return {"identical": a.dtype == b.dtype, "max_abs_diff": 0.0, "rel_l2": 0.0, "cosine": 1.0 if a.numel else None}
    if "complex" in (DTYPES[a.dtype].category, DTYPES[b.dtype].category):
        return {"identical": False, "max_abs_diff": None, "rel_l2": None, "cosine": None}
    identical = a.dtype == b.dtype
    max_abs = 0.0
    dd = aa = bb = ab = 0.0
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for ca, cb in zip(_logical_chunks(stack, a), _logical_chunks(stack, b), strict=True):
            x = ca.to(torch.float64)
            y = cb.to(torch.float64)
            if identical:
                identical = bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())
            d = x - y
            finite = torch.isfinite(d) & torch.isfinite(x) & torch.isfinite(y)
            if not bool(finite.all()):
                x, y, d = x[finite], y[finite], d[finite]
            if d.numel():
                max_abs = max(max_abs, float(d.abs().max()))
                dd += float(torch.dot(d, d))
                aa += float(torch.dot(x, x))
                bb += float(torch.dot(y, y))
                ab += float(torch.dot(x, y))
    rel = math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else None)
    cosine = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None
    return {"identical": identical, "max_abs_diff": max_abs, "rel_l2": rel, "cosine": cosine}
