"""Optional statistics on a torch device (a CUDA GPU): ``compute_stats(..., device="cuda")``.

Each tensor's distinct elements are copied to the device once, chunk by chunk straight from the
file mapping (the same walker as the host engine), then reduced there with torch ops in slices of
``DEVICE_SLICE`` elements, which bounds the float64 temporaries. Definitions are the host
kernel's exactly: float64 sums, two-pass variance around the provisional mean, NaN/Inf counted
and left out of the values, 64 bins over [min, max] with the maximum in the last bin. Small
tensors go through the same batched segmented reductions as on the host, on the device.

The code is device-agnostic: the tests run it on the "cpu" device against the same references
as the host kernel; the benchmark reports its throughput on CUDA where a GPU is present.
"""

from __future__ import annotations

import math
import mmap

import torch

from app.formats.model import TensorInfo

from .model import HIST_BINS, TensorStats

DEVICE_SLICE = 1 << 26  # elements reduced at once on the device


def resolve_device(requested: str | None) -> str | None:
    """The torch device for stats from the CKPTSCOPE_STATS_DEVICE setting: None (the host kernel)
    for "" or "host", a CUDA device for "auto" when one is present, else the name as given."""
    if not requested or requested == "host":
        return None
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else None
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"stats device {requested!r} asked for, but torch sees no CUDA device")
    torch.empty(0, device=requested)  # refuses an unknown device name now, not at the first job
    return requested


def tensor_stats_on_device(device: str, mm: mmap.mmap | None, info: TensorInfo) -> TensorStats:
    from .engine import _Accumulator, _Buffers, _TensorWalker, plan_view, unsupported_note

    note = unsupported_note(info)
    if note is not None:
        return TensorStats(numel=info.numel, note=note)
    if info.numel == 0 or mm is None:
        return TensorStats(numel=info.numel)
    plan = plan_view(info)
    walker = _TensorWalker(mm, info, plan, _Buffers())
    x = torch.empty(plan.count, dtype=walker.compute_dtype, device=device)
    filled = 0
    for chunk in walker.chunks():
        x[filled : filled + chunk.numel()].copy_(chunk)
        filled += chunk.numel()
    walker.release()
    acc = _Accumulator()
    values = []  # the finite values of each slice, for pass 2
    sums = []
    for s in x.split(DEVICE_SLICE):  # pass 1
        acc.nonzero += int(torch.count_nonzero(s))
        total = s.sum(dtype=torch.float64)
        if not math.isfinite(float(total)):
            nan = int(torch.isnan(s).sum())
            acc.nan += nan
            acc.inf += s.numel() - nan - int(torch.isfinite(s).sum())
            s = s[torch.isfinite(s)]
            total = s.sum(dtype=torch.float64)
        if s.numel():
            lo, hi = torch.aminmax(s)
            acc.lo, acc.hi = min(acc.lo, float(lo)), max(acc.hi, float(hi))
            acc.n += s.numel()
            sums.append(total)
            values.append(s)
    if acc.n == 0:
        return acc.result(info.numel, plan.count, plan.factor, 0.0)
    acc.total = float(torch.stack(sums).sum())
    mean = acc.total / acc.n
    scale = acc.hist_scale()
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
    shift = torch.zeros((), dtype=torch.float64, device=device)
    css = torch.zeros((), dtype=torch.float64, device=device)
    for s in values:  # pass 2
        s64 = s.to(torch.float64)
        d = s64 - mean
        shift += d.sum()
        css += torch.dot(d, d)
        bins = (s64 - acc.lo).mul_(scale).clamp_(max=HIST_BINS - 1).to(torch.int64)
        hist += torch.bincount(bins, minlength=HIST_BINS)
    acc.shift, acc.css = float(shift), float(css)
    acc.hist = hist.cpu()
    return acc.result(info.numel, plan.count, plan.factor, mean)


def describe(device: str) -> str:
    """A line for logs: which device computes the stats."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return device
