"""Statistics of many small tensors at once: per-tensor Python work would dominate (~0.3 ms each),
so their values are gathered into one float64 vector with segment ids and every statistic is a
segmented reduction. Same definitions as the per-tensor engines, float64 throughout."""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import numpy as np
import torch

from ckptscope.formats.model import DTYPES, TensorInfo, contiguous_stride

from . import digest as digests
from .model import HIST_BINS, PERCENTILES, LogHistogram, TensorStats
from .percentiles import QUANTILES
from .walk import TORCH_DTYPES, plan_view

SMALL_ELEMENTS = 16384  # tensors up to this size are summarised in batches
BATCH_ELEMENTS = 1 << 18


def batchable(info: TensorInfo) -> bool:
    if not info.plain:
        return False
    if not 0 < info.numel <= SMALL_ELEMENTS or info.dtype not in TORCH_DTYPES:
        return False
    if DTYPES[info.dtype].category == "complex":
        return False
    plan = plan_view(info)
    return plan.dense and plan.factor == 1


def batch_stats(mm: mmap.mmap, infos: Sequence[TensorInfo], device: str | None = None) -> list[TensorStats]:
    """Statistics of many small dense tensors of one file at once: per-tensor Python work would
    dominate (~0.3 ms each), so values are gathered into one float64 vector with segment ids and
    every statistic is a segmented reduction. Same definitions, float64 throughout."""
    k = len(infos)
    pieces: list[torch.Tensor] = []
    run_start = run_end = -1
    run_dtype = ""
    for t in infos:  # adjacent ranges of one dtype become one zero-copy view
        start = t.data_offset
        if t.dtype == run_dtype and start == run_end:
            run_end = start + t.nbytes
            continue
        if run_dtype:
            pieces.append(_range(mm, run_dtype, run_start, run_end))
        run_dtype, run_start, run_end = t.dtype, start, start + t.nbytes
    pieces.append(_range(mm, run_dtype, run_start, run_end))
    x = torch.cat([p.to(torch.float64) for p in pieces]).to(device or "cpu")
    counts = torch.tensor([t.numel for t in infos], dtype=torch.int64, device=x.device)
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
    percentiles = _percentiles(x, seg, finite, nf, k, all(t.dtype in NARROW for t in infos))
    log_hists = _log_histograms(x, seg, finite, infos, k)
    out = []
    for i, (t, n, cs, m, a, b, z, na, inn) in enumerate(
        zip(
            infos,
            nf.tolist(),
            css.tolist(),
            mean.tolist(),
            lo.tolist(),
            hi.tolist(),
            nonzero.tolist(),
            nan.tolist(),
            inf.tolist(),
            strict=True,
        )
    ):
        stats = TensorStats(numel=t.numel, zeros=t.numel - int(z), nan=int(na), inf=int(inn), hist=hist[i])
        if n > 0:
            stats.mean, stats.min, stats.max = m, a, b
            stats.std = math.sqrt(cs / (n - 1)) if n > 1 else None
            stats.l2 = math.sqrt(cs + n * m * m)
            stats.absmax = max(abs(a), abs(b))
            stats.hist_min, stats.hist_max = a, b
            stats.percentiles = dict(zip(PERCENTILES, percentiles[i], strict=True))
            stats.log_hist = log_hists[i]
        if t.stride == contiguous_stride(t.shape) or _row_major(t):  # the byte range is the values in C order
            stats.digest = digests.digest_of_bytes(t, memoryview(mm)[t.data_offset : t.data_offset + t.nbytes])
        else:  # a permuted view: hashed in its logical order
            stats.digest = digests.tensor_digest(t)
        out.append(stats)
    return out


def _row_major(t: TensorInfo) -> bool:
    plan = plan_view(t)
    return plan.stride == contiguous_stride(plan.shape)


# dtypes whose every value is a float32 value (their batches sort on 64-bit (tensor, key) pairs)
NARROW = frozenset(
    {"float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}
    | {"int8", "uint8", "int16", "uint16", "bool"}
)


def _sorted_by_tensor(values: torch.Tensor, seg: torch.Tensor, narrow: bool) -> torch.Tensor:
    """``values`` sorted by tensor, then value. Where every value is a float32 value, one sort of
    (tensor << 32 | the float32's order-preserving key) does it; else two stable ones."""
    if not narrow:
        order = torch.argsort(values, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        return values[order]
    u = values.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(u >= 0x80000000, ~u & 0xFFFFFFFF, u | 0x80000000)
    low = torch.sort((seg << 32) | key).values & 0xFFFFFFFF
    bits = torch.where(low >= 0x80000000, low ^ 0x80000000, ~low & 0xFFFFFFFF)
    return bits.to(torch.int32).view(torch.float32).to(torch.float64)


def _percentiles(
    x: torch.Tensor, seg: torch.Tensor, finite: torch.Tensor, nf: torch.Tensor, k: int, narrow: bool
) -> list[list[float]]:
    """Each tensor's percentiles: its finite values sorted (by tensor, then value), then the order
    statistics at q * (n - 1) interpolated linearly, like torch.quantile."""
    values = torch.where(finite, x, math.inf)  # non-finite values sort after each tensor's finite ones
    ordered = _sorted_by_tensor(values, seg, narrow)
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
    return value.tolist()


def _log_histograms(
    x: torch.Tensor, seg: torch.Tensor, finite: torch.Tensor, infos: Sequence[TensorInfo], k: int
) -> list[LogHistogram]:
    """Counts by sign and binary exponent, with subnormals at the smallest normal exponent minus one
    of the dtype the values are computed in (float32, or float64 for float64 and integer tensors:
    the other engines' convention)."""
    nonzero = finite & (x != 0)
    v, s = x[nonzero], seg[nonzero]
    wide = torch.tensor([t.dtype == "float64" or DTYPES[t.dtype].category != "float" for t in infos], device=x.device)
    floor = torch.where(wide, -1023, -127)[s]
    exponent = torch.maximum(torch.frexp(v).exponent.to(torch.int64) - 1, floor)
    group = s * 2 + (v > 0).to(torch.int64)  # (tensor, sign): ascending with the code below
    keys, counts = torch.unique(group * 4096 + (exponent + 2048), return_counts=True)
    codes = keys.cpu().numpy()
    exponents = (codes % 4096 - 2048).tolist()
    numbers = counts.cpu().tolist()
    bounds = np.searchsorted(codes // 4096, np.arange(2 * k + 1)).tolist()  # where each group starts
    zeros = torch.bincount(seg[finite & (x == 0)], minlength=k).tolist()
    hists = []
    for i in range(k):
        a, b, c = bounds[2 * i], bounds[2 * i + 1], bounds[2 * i + 2]
        neg = dict(zip(exponents[a:b], numbers[a:b], strict=True))
        pos = dict(zip(exponents[b:c], numbers[b:c], strict=True))
        hists.append(LogHistogram(neg, int(zeros[i]), pos))
    return hists


def _range(mm: mmap.mmap, dtype: str, start: int, end: int) -> torch.Tensor:
    itemsize = DTYPES[dtype].itemsize
    return torch.frombuffer(mm, dtype=TORCH_DTYPES[dtype], count=(end - start) // itemsize, offset=start)
