"""Element-wise comparison of two tensors of the same shape, chunked, in logical order."""

from __future__ import annotations

import math
import mmap
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from ckptscope.formats.gguf_decoding import decoded_chunks, undecodable_note
from ckptscope.formats.model import DTYPES, TensorInfo
from ckptscope.formats.tensor_views import logical_view, row_blocks
from ckptscope.formats.writers import OutputTensor, iter_tensor_bytes

CHUNK_ELEMENTS = 1 << 20


def _logical_chunks(stack: ExitStack, info: TensorInfo) -> Iterator[torch.Tensor]:
    if info.pieces or info.quant is not None:  # stitched or dequantized: as an export writes them
        out = OutputTensor(info.name, info)
        dtype = getattr(torch, out.out_dtype)
        for part in iter_tensor_bytes(out):
            yield torch.frombuffer(bytearray(part), dtype=dtype)
        return
    fh = stack.enter_context(open(info.storage.path, "rb"))
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    stack.callback(mm.close)
    if info.encoding is not None:  # decoded blocks (new arrays: nothing keeps the mapping)
        for values in decoded_chunks(mm, info, CHUNK_ELEMENTS):
            yield torch.from_numpy(values)
        return
    view = logical_view(mm, info)
    try:
        for block in row_blocks(view, CHUNK_ELEMENTS):
            yield block.reshape(-1)
    finally:
        del view


def _paired(xs: Iterator[torch.Tensor], ys: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Two chunkings of the same number of values re-cut into pairs of equal length (decoded
    blocks and row blocks are cut at different places)."""
    empty = torch.empty(0)
    x: torch.Tensor | None = empty
    y: torch.Tensor | None = empty
    while True:
        while x is not None and not x.numel():
            x = next(xs, None)
        while y is not None and not y.numel():
            y = next(ys, None)
        if x is None or y is None:
            if x is not None or y is not None:
                raise ValueError("compared tensors have different numbers of values")
            return
        n = min(x.numel(), y.numel())
        yield x[:n], y[:n]
        x, y = x[n:], y[n:]


def identical_by_digest(
    a: TensorInfo, b: TensorInfo, digest_a: str | None, digest_b: str | None
) -> dict[str, Any] | None:
    """``compare``'s result for two tensors whose content digests (``stats.digest``: dtype, shape and
    logical bytes) are equal, without reading them (``skipped_read``); None when either digest is
    unknown, they differ, or the tensors' types or shapes do (then ``compare`` reads them)."""
    if digest_a is None or digest_a != digest_b or a.shape != b.shape or a.shown_dtype != b.shown_dtype:
        return None
    return {
        "identical": True,
        "max_abs_diff": 0.0,
        "rel_l2": 0.0,
        "cosine": 1.0 if a.numel else None,
        "skipped_read": True,
    }


def compare(a: TensorInfo, b: TensorInfo) -> dict[str, Any]:
    """max |a-b|, ||a-b|| / ||a||, cosine similarity, and whether the values are identical
    (NaN equal to NaN). Non-finite differences are left out of the norms. Encoded tensors (GGUF
    quantisations) are compared as their dequantized float32 values, and say so in ``note``."""
    if a.shape != b.shape:
        raise ValueError("compare needs tensors of the same shape")
    same_type = a.shown_dtype == b.shown_dtype
    note = {}
    if a.encoding is not None or b.encoding is not None or a.quant is not None or b.quant is not None:
        note = {"note": f"compared as dequantized float32 values ({a.shown_dtype} and {b.shown_dtype})"}
    if a.view_key == b.view_key or a.numel == 0:
        return {"identical": same_type, "max_abs_diff": 0.0, "rel_l2": 0.0, "cosine": 1.0 if a.numel else None}
    undecodable = undecodable_note(a) or undecodable_note(b)
    if undecodable:
        return {"identical": False, "max_abs_diff": None, "rel_l2": None, "cosine": None, "note": undecodable}
    if "complex" in (DTYPES[a.dtype].category, DTYPES[b.dtype].category):
        return {"identical": False, "max_abs_diff": None, "rel_l2": None, "cosine": None}
    identical = same_type
    max_abs = 0.0
    dd = aa = bb = ab = 0.0
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for ca, cb in _paired(_logical_chunks(stack, a), _logical_chunks(stack, b)):
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
    return {"identical": identical, "max_abs_diff": max_abs, "rel_l2": rel, "cosine": cosine, **note}
