"""Statistics of many small tensors at once: per-tensor Python work would dominate (~0.3 ms each),
so their values are gathered into one float64 vector with segment ids and every statistic is a
segmented reduction. Same definitions as the per-tensor engines, float64 throughout.

Two implementations of the same reductions: numpy on the CPU (the C kernel converts each dtype to
its compute width, so the CPU path never imports torch), and torch ops on a torch device (the
torch-op engine) or where the kernel is not built. They give the same counts, histograms,
percentiles, log-magnitude histograms and digests exactly; mean, std and l2 may differ in the
last bits (summation order). Assembling the records from the reductions is shared."""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ckptscope.formats.model import DTYPES, TensorInfo, contiguous_stride

from . import digest as digests
from .kernel_engine import load_kernel
from .model import HIST_BINS, PERCENTILES, LogHistogram, TensorStats
from .percentiles import QUANTILES
from .walk import STATS_DTYPES, computes_in_double, plan_view

if TYPE_CHECKING:
    import torch

SMALL_ELEMENTS = 16384  # tensors up to this size are summarised in batches
BATCH_ELEMENTS = 1 << 18
# The numpy path reduces a batch in slices of at most this many values: its temporaries (a few
# dozen of 512 KiB) stay in cache and in memory the allocator reuses. Slices of 2**18 values were
# fresh pages every time: a third of the CPU time went to page faults.
NUMPY_ELEMENTS = 1 << 16

# dtypes whose every value is a float32 value (their batches sort by the float32s' order-preserving keys)
NARROW = frozenset(
    {"float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"} | {"int8", "uint8", "int16", "uint16", "bool"}
)
_EXPONENT_OFFSET = 2048  # log-histogram codes: (tensor * 2 + positive) * 4096 + exponent + 2048


def batchable(info: TensorInfo) -> bool:
    """A small tensor whose elements are one dense run of its file, each once."""
    if not info.plain or info.dtype not in STATS_DTYPES:
        return False
    if not 0 < info.numel <= SMALL_ELEMENTS:
        return False
    if info.stride == contiguous_stride(info.shape):  # the common case, without planning the view
        return True
    plan = plan_view(info)
    return plan.dense and plan.factor == 1


@dataclass(slots=True)
class _Reduced:
    """A batch's per-tensor reductions as Python values (index i: the batch's tensor i)."""

    finite: list[float]  # finite values
    css: list[float]  # centred sum of squares of the finite values
    mean: list[float]
    lo: list[float]
    hi: list[float]
    nonzero: Sequence[float]  # elements other than zero, NaN and Inf included (ints or floats)
    nan: Sequence[float]
    inf: Sequence[float]
    hist: list[list[int]]
    percentiles: list[list[float]] | None  # None: not computed (``extras`` off)
    log_hists: list[LogHistogram] | None


def batch_stats(
    mm: mmap.mmap, infos: Sequence[TensorInfo], device: str | None = None, extras: bool = True
) -> list[TensorStats]:
    """Statistics of many small dense tensors of one file at once. ``device``: None for the CPU
    (numpy, with the C kernel's conversions; torch ops on the CPU where the kernel is not built),
    or a torch device for the torch-op engine there. ``extras``: also the percentiles, the
    log-magnitude histogram and the digest (else the moments, counts and histogram alone)."""
    if device is None and load_kernel()[0] is not None:
        out: list[TensorStats] = []
        for part in _slices(infos, NUMPY_ELEMENTS):
            layout = _layout(part)
            # float64 squares of huge values overflow to inf as in the other engines, silently
            with np.errstate(over="ignore", invalid="ignore"):
                reduced = _numpy_reductions(mm, part, layout, extras)
            out += _records(mm, part, layout, reduced, extras)
        return out
    layout = _layout(infos)
    return _records(mm, infos, layout, _torch_reductions(mm, infos, layout, device or "cpu", extras), extras)


def _slices(infos: Sequence[TensorInfo], elements: int) -> list[Sequence[TensorInfo]]:
    """Consecutive runs of ``infos`` of at most ``elements`` values each (or one tensor)."""
    parts: list[Sequence[TensorInfo]] = []
    first = filled = 0
    for i, t in enumerate(infos):
        numel = t.numel
        if filled + numel > elements and i > first:
            parts.append(infos[first:i])
            first, filled = i, 0
        filled += numel
    parts.append(infos[first:])
    return parts


@dataclass(slots=True)
class _Layout:
    """Where a batch's tensors lie, read once (each ``TensorInfo`` property is a computation)."""

    numel: list[int]
    start: list[int]  # byte offset of each tensor's first element in the file
    end: list[int]
    runs: list[tuple[str, int, int]]  # (dtype, start, end): adjacent ranges of one dtype as one


def _layout(infos: Sequence[TensorInfo]) -> _Layout:
    out = _Layout([], [], [], [])
    run_dtype, run_start, run_end = "", -1, -1
    for t in infos:
        numel, start = t.numel, t.data_offset
        end = start + numel * DTYPES[t.dtype].itemsize
        out.numel.append(numel)
        out.start.append(start)
        out.end.append(end)
        if t.dtype == run_dtype and start == run_end:
            run_end = end
            continue
        if run_dtype:
            out.runs.append((run_dtype, run_start, run_end))
        run_dtype, run_start, run_end = t.dtype, start, end
    out.runs.append((run_dtype, run_start, run_end))
    return out


def _records(
    mm: mmap.mmap, infos: Sequence[TensorInfo], layout: _Layout, r: _Reduced, extras: bool
) -> list[TensorStats]:
    out = []
    data = memoryview(mm)
    for i, t in enumerate(infos):
        n, m, a, b = r.finite[i], r.mean[i], r.lo[i], r.hi[i]
        numel = layout.numel[i]
        stats = TensorStats(numel=numel, zeros=numel - int(r.nonzero[i]), nan=int(r.nan[i]), inf=int(r.inf[i]))
        stats.hist = r.hist[i]
        if n > 0:
            cs = r.css[i]
            stats.mean, stats.min, stats.max = m, a, b
            stats.std = math.sqrt(cs / (n - 1)) if n > 1 else None
            stats.l2 = math.sqrt(cs + n * m * m)
            stats.absmax = max(abs(a), abs(b))
            stats.hist_min, stats.hist_max = a, b
            if r.percentiles is not None:
                stats.percentiles = dict(zip(PERCENTILES, r.percentiles[i], strict=True))
            if r.log_hists is not None:
                stats.log_hist = r.log_hists[i]
        if extras:
            stats.digest = _digest(t, data[layout.start[i] : layout.end[i]])
        out.append(stats)
    return out


def _digest(t: TensorInfo, data: memoryview) -> str:
    """``data``: the tensor's byte range."""
    if t.stride == contiguous_stride(t.shape) or _row_major(t):  # the byte range is the values in C order
        return digests.digest_of_bytes(t, data)
    return digests.tensor_digest(t)  # a permuted view: hashed in its logical order


def _row_major(t: TensorInfo) -> bool:
    plan = plan_view(t)
    return plan.stride == contiguous_stride(plan.shape)


def _log_histograms_from_runs(
    codes: np.ndarray, numbers: np.ndarray, zeros: Sequence[int], k: int
) -> list[LogHistogram]:
    """Each tensor's log-magnitude histogram from counted codes (``_EXPONENT_OFFSET``), their
    (tensor, sign) groups ascending; ``zeros``: each tensor's zero count."""
    exponents = (codes % 4096 - _EXPONENT_OFFSET).tolist()
    counted = numbers.tolist()
    bounds = np.searchsorted(codes // 4096, np.arange(2 * k + 1)).tolist()  # where each group starts
    hists = []
    for i in range(k):
        a, b, c = bounds[2 * i], bounds[2 * i + 1], bounds[2 * i + 2]
        neg = dict(zip(exponents[a:b], counted[a:b], strict=True))
        pos = dict(zip(exponents[b:c], counted[b:c], strict=True))
        hists.append(LogHistogram(neg, zeros[i], pos))
    return hists


# --- numpy on the CPU -------------------------------------------------------------------------


def _as_float64(mm: mmap.mmap, dtype: str, start: int, end: int) -> np.ndarray:
    """The elements of ``dtype`` in ``mm[start:end]`` as float64, converted by the C kernel (to
    float32 first for the dtypes computed in float32: the same values, exactly)."""
    kernel = load_kernel()[0]
    assert kernel is not None  # the numpy path runs only where the kernel is built
    count = (end - start) // DTYPES[dtype].itemsize
    out = np.empty(count, dtype=np.float64 if computes_in_double(dtype) else np.float32)
    with memoryview(mm) as data:
        kernel.convert(data[start:end], count, kernel.DTYPES[dtype], out)
    return out.astype(np.float64, copy=False)


def _numpy_reductions(mm: mmap.mmap, infos: Sequence[TensorInfo], layout: _Layout, extras: bool) -> _Reduced:
    k = len(infos)
    pieces = [_as_float64(mm, dtype, start, end) for dtype, start, end in layout.runs]
    x = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    counts = np.array(layout.numel, dtype=np.int64)
    starts = np.cumsum(counts) - counts

    def each(per_tensor: np.ndarray) -> np.ndarray:  # a value per tensor, repeated for its elements
        return np.repeat(per_tensor, counts)

    finite = np.isfinite(x)
    clean = bool(finite.all())
    nonzero = np.add.reduceat(x != 0, starts, dtype=np.int64)
    if clean:
        nan = inf = np.zeros(k, dtype=np.int64)
        xf = x
    else:
        nan = np.add.reduceat(np.isnan(x), starts, dtype=np.int64)
        inf = np.add.reduceat(np.isinf(x), starts, dtype=np.int64)
        xf = np.where(finite, x, 0.0)
    nf = (counts - nan - inf).astype(np.float64)
    safe_n = np.maximum(nf, 1.0)
    mean = np.add.reduceat(xf, starts) / safe_n
    d = xf - each(mean)
    if not clean:
        d[~finite] = 0.0
    delta = np.add.reduceat(d, starts) / safe_n
    np.multiply(d, d, out=d)
    css = np.maximum(np.add.reduceat(d, starts) - nf * delta * delta, 0.0)
    mean += delta
    lo = np.minimum.reduceat(x if clean else np.where(finite, x, math.inf), starts)
    hi = np.maximum.reduceat(x if clean else np.where(finite, x, -math.inf), starts)

    width = hi - lo
    scale = np.where(width > 0, HIST_BINS / np.where(width > 0, width, 1.0), 0.0)
    with np.errstate(invalid="ignore"):  # an infinite width times a zero scale: bin 0, as in torch
        bins = x - each(lo)
        bins *= each(scale)
        if not clean:
            bins[~finite] = 0.0
        idx = bins.astype(np.int64)
    np.clip(idx, 0, HIST_BINS - 1, out=idx)
    idx += each(np.arange(0, k * HIST_BINS, HIST_BINS))
    if not clean:
        idx[~finite] = k * HIST_BINS
    hist = np.bincount(idx, minlength=k * HIST_BINS + 1)[: k * HIST_BINS].reshape(k, HIST_BINS)

    percentiles = log_hists = None
    if extras:
        values = x if clean else np.where(finite, x, math.inf)  # non-finite values sort after the finite
        ordered = _numpy_sorted_by_tensor(values, counts, starts, all(t.dtype in NARROW for t in infos))
        percentiles = _numpy_percentiles(ordered, starts, safe_n).tolist()
        log_hists = _numpy_log_histograms(ordered, each(np.arange(k)), infos, (counts - nonzero).tolist())
    return _Reduced(
        nf.tolist(),
        css.tolist(),
        mean.tolist(),
        lo.tolist(),
        hi.tolist(),
        nonzero.tolist(),
        nan.tolist(),
        inf.tolist(),
        hist.tolist(),
        percentiles,
        log_hists,
    )


def _numpy_sorted_by_tensor(values: np.ndarray, counts: np.ndarray, starts: np.ndarray, narrow: bool) -> np.ndarray:
    """``values`` sorted within each tensor's run, in the torch implementation's order: where every
    value is a float32 value, by the float32's order-preserving key (-0.0 before +0.0; the result
    is float32); else by value, equal values (-0.0 and +0.0) in file order, as a stable sort gives.
    Tensors of one size are sorted as the rows of one matrix: numpy's vectorised sort of short rows
    is ~20x faster than one sort of the whole batch."""
    if narrow:
        keys = values.astype(np.float32).view(np.uint32)
        keys ^= (keys.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)  # flip all bits, or the sign
        low = _sorted_runs(keys, counts, starts)
        low ^= (~(low.view(np.int32) >> 31)).view(np.uint32) | np.uint32(0x80000000)  # back to the bits
        return low.view(np.float32)
    ordered = _sorted_runs(values, counts, starts)
    ordered[ordered == 0] = values[values == 0]  # each tensor's zeros, signed, in file order
    return ordered


def _sorted_runs(values: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``values`` with each run (``counts`` from ``starts``) sorted: one row sort per size."""
    out = np.empty_like(values)
    by_size = np.argsort(counts, kind="stable")
    groups = np.split(by_size, np.flatnonzero(np.diff(counts[by_size])) + 1)
    for members in groups:
        idx = starts[members, None] + np.arange(counts[members[0]])
        block = values[idx]
        block.sort(axis=1)
        out[idx] = block
    return out


def _numpy_percentiles(ordered: np.ndarray, starts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Each tensor's percentiles (k x 9): its ``n`` finite values lead its run of ``ordered``; the
    order statistics at q * (n - 1) interpolated linearly, like torch.quantile."""
    q = np.asarray(QUANTILES, dtype=np.float64)
    pos = q[None, :] * (n[:, None] - 1)
    lo = np.floor(pos)
    frac = pos - lo
    lo_i = lo.astype(np.int64)
    hi_i = np.minimum(lo_i + 1, (n - 1).astype(np.int64)[:, None])
    a = ordered[starts[:, None] + lo_i].astype(np.float64)
    b = ordered[starts[:, None] + hi_i].astype(np.float64)
    with np.errstate(invalid="ignore"):  # tensors without finite values: unused
        value: np.ndarray = np.where((frac == 0) | (a == b), a, a + frac * (b - a))
    return value


def _numpy_log_histograms(
    ordered: np.ndarray, seg: np.ndarray, infos: Sequence[TensorInfo], zeros: Sequence[int]
) -> list[LogHistogram]:
    """Counts by sign and binary exponent, with subnormals at the smallest normal exponent minus one
    of the dtype the values are computed in (float32, or float64 for float64 and integer tensors:
    the other engines' convention). In ``ordered`` each (tensor, sign, exponent) is one run, so
    counting is finding where runs start: no second sort."""
    k = len(infos)
    nonzero = np.isfinite(ordered) & (ordered != 0)
    s = seg[nonzero]
    if ordered.dtype == np.float32:  # the exponent field: a subnormal's reads -127, float32's floor
        top = (ordered[nonzero].view(np.uint32) >> 23).astype(np.int64)  # sign and exponent field
        positive = top < 0x100
        exponent = (top & 0xFF) - 127
    else:  # float64: a subnormal's field reads -1023, float64's floor
        top = (ordered[nonzero].view(np.uint64) >> np.uint64(52)).astype(np.int64)
        positive = top < 0x800
        exponent = (top & 0x7FF) - 1023
        if exponent.size and exponent.min() < -127:  # float32 subnormals among float64 values count at -127
            narrow = np.fromiter((not computes_in_double(t.dtype) for t in infos), dtype=bool, count=k)
            exponent[narrow[s] & (exponent < -127)] = -127
    codes = s * 2
    codes += positive
    codes *= 4096
    codes += exponent
    codes += _EXPONENT_OFFSET
    run_starts = np.flatnonzero(np.concatenate(([True], codes[1:] != codes[:-1]))) if codes.size else codes
    numbers = np.diff(np.append(run_starts, codes.size))
    return _log_histograms_from_runs(codes[run_starts], numbers, zeros, k)


# --- torch ops on a torch device, or on the CPU without the kernel ----------------------------


def _torch_reductions(
    mm: mmap.mmap, infos: Sequence[TensorInfo], layout: _Layout, device: str, extras: bool
) -> _Reduced:
    import torch

    k = len(infos)
    pieces = [_torch_range(mm, dtype, start, end) for dtype, start, end in layout.runs]
    x = torch.cat([p.to(torch.float64) for p in pieces]).to(device)
    counts = torch.tensor(layout.numel, dtype=torch.int64, device=x.device)
    seg = torch.repeat_interleave(torch.arange(k, device=x.device), counts)

    def per_tensor(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, seg, values)

    finite = torch.isfinite(x)
    clean = bool(finite.all())
    nonzero = per_tensor((x != 0).to(torch.float64))
    if clean:
        nan = inf = torch.zeros(k, dtype=torch.float64, device=x.device)
        xf = x
    else:
        nan = per_tensor(torch.isnan(x).to(torch.float64))
        inf = per_tensor(torch.isinf(x).to(torch.float64))
        xf = torch.where(finite, x, 0.0)
    nf = counts.to(torch.float64) - nan - inf
    safe_n = nf.clamp(min=1)
    mean = per_tensor(xf) / safe_n
    d = xf - mean[seg]
    if not clean:
        d = torch.where(finite, d, 0.0)
    delta = per_tensor(d) / safe_n
    css = (per_tensor(d * d) - nf * delta * delta).clamp(min=0)
    mean = mean + delta
    lo = torch.full((k,), math.inf, dtype=torch.float64, device=x.device).scatter_reduce_(
        0, seg, x if clean else torch.where(finite, x, math.inf), "amin"
    )
    hi = torch.full((k,), -math.inf, dtype=torch.float64, device=x.device).scatter_reduce_(
        0, seg, x if clean else torch.where(finite, x, -math.inf), "amax"
    )
    width = hi - lo
    scale = torch.where(width > 0, HIST_BINS / torch.where(width > 0, width, 1.0), 0.0)
    bins = (x - lo[seg]) * scale[seg]
    if not clean:
        bins = torch.where(finite, bins, 0.0)
    idx = bins.to(torch.int64).clamp_(0, HIST_BINS - 1) + seg * HIST_BINS
    if not clean:
        idx = torch.where(finite, idx, k * HIST_BINS)
    hist = torch.bincount(idx, minlength=k * HIST_BINS + 1)[: k * HIST_BINS].view(k, HIST_BINS).tolist()
    percentiles = log_hists = None
    if extras:
        percentiles = _torch_percentiles(x, seg, finite, nf, k, all(t.dtype in NARROW for t in infos))
        log_hists = _torch_log_histograms(x, seg, finite, infos, k)
    return _Reduced(
        nf.tolist(),
        css.tolist(),
        mean.tolist(),
        lo.tolist(),
        hi.tolist(),
        nonzero.tolist(),
        nan.tolist(),
        inf.tolist(),
        hist,
        percentiles,
        log_hists,
    )


def _torch_sorted_by_tensor(values: torch.Tensor, seg: torch.Tensor, narrow: bool) -> torch.Tensor:
    """``values`` sorted by tensor, then value. Where every value is a float32 value, one sort of
    (tensor << 32 | the float32's order-preserving key) does it; else two stable ones."""
    import torch

    if not narrow:
        order = torch.argsort(values, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        return values[order]
    u = values.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(u >= 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)
    low = torch.sort((seg << 32) | key).values & 0xFFFFFFFF
    bits = torch.where(low >= 0x80000000, low ^ 0x80000000, ~low & 0xFFFFFFFF)
    return bits.to(torch.int32).view(torch.float32).to(torch.float64)


def _torch_percentiles(
    x: torch.Tensor, seg: torch.Tensor, finite: torch.Tensor, nf: torch.Tensor, k: int, narrow: bool
) -> list[list[float]]:
    """Each tensor's percentiles: its finite values sorted (by tensor, then value), then the order
    statistics at q * (n - 1) interpolated linearly, like torch.quantile."""
    import torch

    values = torch.where(finite, x, math.inf)  # non-finite values sort after each tensor's finite ones
    ordered = _torch_sorted_by_tensor(values, seg, narrow)
    counts = torch.bincount(seg, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    q = torch.tensor(QUANTILES, dtype=torch.float64, device=x.device)
    n = nf.clamp(min=1).to(torch.float64)
    pos = q[None, :] * (n[:, None] - 1)
    lo = pos.floor()
    frac = pos - lo
    lo_i = lo.to(torch.int64)
    hi_i = torch.minimum(lo_i + 1, (n - 1).to(torch.int64)[:, None])
    a = ordered[starts[:, None] + lo_i]
    b = ordered[starts[:, None] + hi_i]
    value = torch.where((frac == 0) | (a == b), a, a + frac * (b - a))
    result: list[list[float]] = value.tolist()
    return result


def _torch_log_histograms(
    x: torch.Tensor, seg: torch.Tensor, finite: torch.Tensor, infos: Sequence[TensorInfo], k: int
) -> list[LogHistogram]:
    """Counts by sign and binary exponent (as ``_numpy_log_histograms``), counted by sorting the
    codes."""
    import torch

    nonzero = finite & (x != 0)
    v, s = x[nonzero], seg[nonzero]
    wide = torch.tensor([computes_in_double(t.dtype) for t in infos], device=x.device)
    floor = torch.where(wide, -1023, -127)[s]
    exponent = torch.maximum(torch.frexp(v).exponent.to(torch.int64) - 1, floor)
    group = s * 2 + (v > 0).to(torch.int64)  # (tensor, sign): ascending with the code below
    codes, numbers = torch.unique(group * 4096 + (exponent + _EXPONENT_OFFSET), return_counts=True)
    zeros = torch.bincount(seg[finite & (x == 0)], minlength=k).tolist()
    return _log_histograms_from_runs(codes.cpu().numpy(), numbers.cpu().numpy(), zeros, k)


def _torch_range(mm: mmap.mmap, dtype: str, start: int, end: int) -> torch.Tensor:
    import torch

    itemsize = DTYPES[dtype].itemsize
    return torch.frombuffer(mm, dtype=getattr(torch, dtype), count=(end - start) // itemsize, offset=start)
