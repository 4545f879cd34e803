"""A tensor reduced to something small enough to draw: a heatmap of at most 512x512 cells, or a
line of at most 1024 points, whatever the tensor's size.

What is drawn (``plan_preview``):
- a 2-D tensor as a rows x cols matrix;
- a 1-D tensor as a line;
- a higher rank by a slice: ``index`` gives leading indices (``(0, 3)`` on a conv weight
  ``[out, in, kh, kw]`` picks ``w[0, 3]``, a ``kh x kw`` matrix); what is left is drawn as above,
  and when more than two dimensions are left they are flattened onto the columns,
  ``[d0, d1 * d2 * ...]`` (without ``index`` a conv weight is ``[out, in * kh * kw]``, the same
  matrix the spectrum uses).

How (``reduce_tensor``): the matrix is cut into blocks of ``ceil(rows / 512)`` x
``ceil(cols / 512)`` elements (each axis on its own, so a 32000 x 4096 embedding becomes 508 x 512
cells) and each block becomes one cell:
- ``reduce="mean"``: the mean of the block's finite values;
- ``reduce="absmax"``: the block's value of largest magnitude, *with its sign* (so the diverging
  colour map still shows which way the outlier points; a tie between +a and -a shows +a).
NaN and Inf are left out of both; a block with no finite value is NaN (drawn grey). A line keeps
the mean and the min..max envelope of each of its blocks.

The values stream from the file in chunks of ``CHUNK_ELEMENTS`` (``formats.writers.iter_tensor_bytes``:
plain byte ranges are read with ``read``, strided views, casts, GGUF blocks and torch quantized
tensors a bounded block at a time), and each chunk is folded into the cells at its position in
row-major order, so memory stays at a few chunks whatever the tensor's size and the time is one
pass over the (sliced) data. One exception: a torch.distributed.checkpoint tensor stitched from
chunks is assembled in memory by the writers' reader, so those are refused above
``MAX_STITCHED_BYTES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ckptscope.errors import Invalid
from ckptscope.formats.gguf_decoding import undecodable_note
from ckptscope.formats.model import DTYPES, TensorInfo
from ckptscope.formats.writers import OutputTensor, iter_tensor_bytes

Reduce = Literal["mean", "absmax"]
REDUCES: tuple[Reduce, ...] = ("mean", "absmax")
MAX_CELLS = 512  # heatmap cells a side
MAX_POINTS = 1024  # points of a line
CHUNK_ELEMENTS = 1 << 20  # values folded in at once (8 MiB of float64 and a few temporaries)
MAX_STITCHED_BYTES = 1 << 30  # stitched (DCP) tensors are assembled in memory to be read


class PreviewError(Invalid):
    """A tensor that has no preview (0-d, empty, complex, undecodable) or a slice that does not fit."""

    default_code = "no_preview"


@dataclass(frozen=True, slots=True)
class PreviewPlan:
    """What of a tensor is drawn: the flat row-major range [start, start + rows * cols) of its
    values, seen as a rows x cols matrix (rows is 1 for a line)."""

    shape: tuple[int, ...]  # the tensor's
    index: tuple[int, ...]
    drawn: tuple[int, ...]  # the shape after slicing (before flattening onto the columns)
    start: int
    rows: int
    cols: int

    @property
    def kind(self) -> Literal["heatmap", "line"]:
        return "line" if len(self.drawn) == 1 else "heatmap"

    @property
    def grid(self) -> tuple[int, int]:
        """Cells (rows, cols) of the result."""
        if self.kind == "line":
            return 1, _cells(self.cols, MAX_POINTS)[1]
        return _cells(self.rows, MAX_CELLS)[1], _cells(self.cols, MAX_CELLS)[1]


@dataclass(frozen=True, slots=True)
class Preview:
    """``values``: (rows, cols) cells of a heatmap, or for a line the blocks' means (``lo``/``hi``
    their min and max). ``vmax``: the largest finite |value| of ``values`` (0.0 when none)."""

    plan: PreviewPlan
    reduce: Reduce
    values: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @property
    def vmax(self) -> float:
        finite = self.values[np.isfinite(self.values)]
        return float(np.abs(finite).max()) if finite.size else 0.0


def _cells(n: int, most: int) -> tuple[int, int]:
    """(block size, cells) covering n elements with at most ``most`` cells."""
    block = max(1, -(-n // most))
    return block, -(-n // block)


def preview_problem(info: TensorInfo) -> str | None:
    """Why this tensor has no preview, if it has none (from the listing alone)."""
    if not info.shape:
        return "a 0-d tensor (a single value) has no preview"
    if info.numel == 0:
        return "an empty tensor has no preview"
    if info.quant is None and info.encoding is None and DTYPES[info.dtype].category == "complex":
        return f"{info.dtype} tensors have no preview"
    if info.encoding is not None:
        note = undecodable_note(info)
        if note is not None:
            return note
    if info.pieces and info.numel * 8 > MAX_STITCHED_BYTES:
        return (
            f"stitched tensors above {MAX_STITCHED_BYTES >> 20} MiB have no preview "
            "(they are assembled in memory to be read)"
        )
    return None


def plan_preview(info: TensorInfo, index: Sequence[int] = ()) -> PreviewPlan:
    """Which values are drawn, as which matrix (see the module docstring); PreviewError when the
    tensor has none or ``index`` does not fit its shape."""
    why = preview_problem(info)
    if why is not None:
        raise PreviewError(why)
    shape = info.shape
    index = tuple(int(i) for i in index)
    if len(index) >= len(shape):
        raise PreviewError(
            f"index {list(index)} leaves nothing to draw of a {len(shape)}-d tensor "
            f"(give at most {len(shape) - 1} leading indices)",
            "bad_index",
        )
    start = 0
    for i, (at, size) in enumerate(zip(index, shape, strict=False)):
        if not 0 <= at < size:
            raise PreviewError(f"index {at} is out of range for dimension {i} of size {size}", "bad_index")
        start += at * math.prod(shape[i + 1 :])
    drawn = shape[len(index) :]
    if len(drawn) == 1:
        rows, cols = 1, drawn[0]
    else:
        rows, cols = drawn[0], math.prod(drawn[1:])
    return PreviewPlan(shape, index, drawn, start, rows, cols)


def sliced(info: TensorInfo, plan: PreviewPlan) -> tuple[TensorInfo, int]:
    """A plain tensor's slice as a tensor of its own (a view: no bytes read before it), with a
    start of 0; any other tensor as it is, with the plan's start (its values before are skipped)."""
    if not info.plain or not plan.index:
        return info, plan.start
    k = len(plan.index)
    offset = info.storage_offset + sum(i * st for i, st in zip(plan.index, info.stride, strict=False))
    return info._replace(shape=info.shape[k:], stride=info.stride[k:], storage_offset=offset), 0


# dtypes numpy reads as stored (the others are cast to float64 by the writers' reader)
_NUMPY_NATIVE = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}
)


def value_chunks(info: TensorInfo, start: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position relative to ``start``, float64 values) for the tensor's row-major values in
    [start, start + count), in chunks of at most CHUNK_ELEMENTS."""
    out = OutputTensor(info.name, info)
    if not (out.is_byte_copy and info.dtype in _NUMPY_NATIVE):  # cast, strided, decoded, dequantized
        out = OutputTensor(info.name, info, dtype="float64")
    dtype = np.dtype(out.out_dtype)
    itemsize = dtype.itemsize
    pos = 0  # elements of the stream seen so far
    carry = b""
    end = start + count
    for data in iter_tensor_bytes(out):
        if carry:
            data = carry + data
        usable = len(data) - len(data) % itemsize
        carry = data[usable:]
        n = usable // itemsize
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            raw = np.frombuffer(data, dtype=dtype, count=hi - lo, offset=(lo - pos) * itemsize)
            for s in range(0, hi - lo, CHUNK_ELEMENTS):
                yield lo - start + s, raw[s : s + CHUNK_ELEMENTS].astype(np.float64)
        pos += n
        if pos >= end:
            return


_Reduction = Callable[..., np.ndarray]  # np.add.reduce, np.maximum.reduce, np.minimum.reduce


def _cells_along(x: np.ndarray, first: int, block: int, how: _Reduction, axis: int) -> np.ndarray:
    """Reduce ``x`` (2-D) along ``axis`` in cells of ``block`` elements of the matrix, the first
    element of ``x`` being element ``first`` along that axis: one entry per cell touched, the first
    for cell ``first // block``. Whole cells are reduced through a reshape (no copy); the partial
    cells at either end on their own."""
    if block == 1:
        return x
    n = x.shape[axis]
    lead = min((-first) % block, n)
    whole = (n - lead) // block * block
    parts = []
    if lead:
        parts.append(how(x[:lead] if axis == 0 else x[:, :lead], axis=axis, keepdims=True))
    if whole:
        if axis == 0:
            parts.append(how(x[lead : lead + whole].reshape(-1, block, x.shape[1]), axis=1))
        else:
            parts.append(how(x[:, lead : lead + whole].reshape(x.shape[0], -1, block), axis=2))
    if lead + whole < n:
        parts.append(how(x[lead + whole :] if axis == 0 else x[:, lead + whole :], axis=axis, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


class _Grid:
    """Cells over a rows x cols matrix, fed by runs of its row-major values: the sum and the
    count of non-finite values of each cell (for means), and/or its finite max and min."""

    def __init__(self, rows: int, cols: int, grid: tuple[int, int], *, sums: bool, extremes: bool) -> None:
        self.rows, self.cols = rows, cols
        self.bh = max(1, -(-rows // grid[0]))
        self.bw = max(1, -(-cols // grid[1]))
        self.sum = np.zeros(grid) if sums else None
        self.nonfinite = np.zeros(grid) if sums else None
        self.max = np.full(grid, -np.inf) if extremes else None
        self.min = np.full(grid, np.inf) if extremes else None

    def add_run(self, pos: int, x: np.ndarray) -> None:
        """Values at flat positions pos, pos + 1, ... of the matrix."""
        cols = self.cols
        while x.size:
            r, c = divmod(pos, cols)
            if c or x.size < cols:  # a part of one row
                w = min(cols - c, x.size)
                self._add_block(r, c, x[:w].reshape(1, w))
            else:  # whole rows
                w = (x.size // cols) * cols
                self._add_block(r, 0, x[:w].reshape(-1, cols))
            x = x[w:]
            pos += w

    def _add_block(self, r0: int, c0: int, block: np.ndarray) -> None:
        finite = np.isfinite(block)
        clean = bool(finite.all())
        if self.sum is not None and self.nonfinite is not None:
            self._fold(self.sum, r0, c0, block if clean else np.where(finite, block, 0.0), np.add)
            if not clean:
                self._fold(self.nonfinite, r0, c0, (~finite).astype(np.float64), np.add)
        if self.max is not None and self.min is not None:
            self._fold(self.max, r0, c0, block if clean else np.where(finite, block, -np.inf), np.maximum)
            self._fold(self.min, r0, c0, block if clean else np.where(finite, block, np.inf), np.minimum)

    def _fold(self, acc: np.ndarray, r0: int, c0: int, x: np.ndarray, op: np.ufunc) -> None:
        """Fold an h x w block whose top-left element is at (r0, c0): rows first (adding whole
        rows is fast), then columns, on the smaller result."""
        cells = _cells_along(x, r0, self.bh, op.reduce, axis=0)
        cells = _cells_along(cells, c0, self.bw, op.reduce, axis=1)
        r, c = r0 // self.bh, c0 // self.bw
        region = acc[r : r + cells.shape[0], c : c + cells.shape[1]]
        op(region, cells, out=region)

    def _sizes(self) -> np.ndarray:
        """Elements of the matrix in each cell (the last row and column of cells may be short)."""
        h, w = self.sum.shape if self.sum is not None else (0, 0)
        heights = np.minimum(self.bh, self.rows - np.arange(h) * self.bh)
        widths = np.minimum(self.bw, self.cols - np.arange(w) * self.bw)
        return np.outer(heights, widths).astype(np.float64)

    def mean(self) -> np.ndarray:
        assert self.sum is not None and self.nonfinite is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(self.sum / (self._sizes() - self.nonfinite))  # 0/0: NaN, no finite value

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.max is not None and self.min is not None
        lo, hi = self.min.copy(), self.max.copy()
        lo[~np.isfinite(lo)] = np.nan
        hi[~np.isfinite(hi)] = np.nan
        return lo, hi


def reduce_tensor(info: TensorInfo, reduce: str = "mean", index: Sequence[int] = ()) -> Preview:
    """Read the tensor (or its slice) once and reduce it to at most 512x512 cells (a heatmap) or
    1024 points (a line); see the module docstring."""
    if reduce not in REDUCES:
        raise PreviewError(f"reduce must be one of {', '.join(REDUCES)} (got {reduce!r})", "bad_reduce")
    plan = plan_preview(info, index)
    line = plan.kind == "line"
    grid = _Grid(plan.rows, plan.cols, plan.grid, sums=line or reduce == "mean", extremes=line or reduce == "absmax")
    source, start = sliced(info, plan)
    for pos, values in value_chunks(source, start, plan.rows * plan.cols):
        grid.add_run(pos, values)
    if line:
        lo, hi = grid.extremes()
        return Preview(plan, "mean", grid.mean()[0], lo[0], hi[0])
    if reduce == "mean":
        return Preview(plan, "mean", grid.mean())
    lo, hi = grid.extremes()
    with np.errstate(invalid="ignore"):
        signed = np.where(np.abs(lo) > np.abs(hi), lo, hi)  # NaN only where the block had no finite value
    return Preview(plan, "absmax", signed)
