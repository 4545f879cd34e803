"""The torch-op engine: statistics with torch operations on any torch device. It is the engine on
a CUDA GPU (``CKPTSCOPE_STATS_DEVICE=cuda``) and the fallback on the CPU where the C kernel is not
built.

Each tensor's distinct elements are copied to the device once, chunk by chunk straight from the
file mapping (the same walker as the kernel engine), then reduced there in slices of
``DEVICE_SLICE`` elements, which bounds the float64 temporaries. Definitions are the kernel's
exactly: float64 sums, two-pass variance around the provisional mean, NaN/Inf counted and left out
of the values, 64 bins over [min, max] with the maximum in the last bin.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import numpy as np
import torch

from ckptscope.formats.model import TensorInfo

from .model import HIST_BINS, TensorStats
from .percentiles import KEY_BINS, RankPlan
from .walk import Accumulator, Buffers, Chunk, TensorWalker, plan_view, unsupported_note

DEVICE_SLICE = 1 << 26  # elements reduced at once on the device


def chunk_values(chunk: Chunk) -> torch.Tensor:
    """A walk's chunk as a tensor of its compute dtype (float32, or float64), a copy: the chunk's
    buffer is only valid until the walk goes on."""
    raw = torch.frombuffer(chunk.buffer, dtype=getattr(torch, chunk.dtype), count=chunk.n)
    return raw.to(torch.float64 if chunk.is_double else torch.float32, copy=True)


def torch_keys(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top 16 and the next 16 bits of each value's key (int64 tensors; ``percentiles.py``)."""
    if values.dtype == torch.float64:
        u = values.view(torch.int64)
        key = torch.where(u < 0, ~u, u ^ torch.iinfo(torch.int64).min)  # the key's bits, as int64
        return (key >> 48) & 0xFFFF, (key >> 32) & 0xFFFF
    u32 = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    key = torch.where(u32 >= 0x80000000, ~u32 & 0xFFFFFFFF, u32 | 0x80000000)
    return key >> 16, key & 0xFFFF


def torch_key_counts(values: torch.Tensor) -> np.ndarray:
    top, _ = torch_keys(values)
    return torch.bincount(top, minlength=KEY_BINS).cpu().numpy().astype(np.int64)


def tensor_stats_with_torch(
    device: str, mm: mmap.mmap | None, info: TensorInfo, bufs: Buffers | None = None, extras: bool = True
) -> TensorStats:
    """On the CPU the walk's chunks are reduced as they come (each pass walks the file again, so
    memory stays flat); on another device the distinct elements are copied there once and reduced
    in slices. ``extras``: also the percentiles, the log-magnitude histogram and the digest."""
    note = unsupported_note(info)
    if note is not None:
        return TensorStats(numel=info.numel, note=note)
    if info.numel == 0 or mm is None:
        return TensorStats(numel=info.numel)
    plan = plan_view(info)
    walker = TensorWalker(mm, info, plan, bufs or Buffers(), hashing=extras)
    slices: Callable[[], Iterable[torch.Tensor]]
    if device == "cpu":
        slices = partial(_values, walker)
    else:
        x = torch.empty(plan.count, dtype=torch.float64 if walker.compute_double else torch.float32, device=device)
        filled = 0
        for chunk in walker.chunks():
            x[filled : filled + chunk.n].copy_(chunk_values(chunk))
            filled += chunk.n
        walker.release()
        slices = partial(x.split, DEVICE_SLICE)
    acc = Accumulator()
    acc.is_double = walker.compute_double
    dirty = [_pass1(acc, s, extras) for s in slices()]
    mean = acc.total / acc.n if acc.n else 0.0
    if acc.n:
        scale = acc.hist_scale()
        hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum of (x - m), of (x - m)^2
        gathering = TorchGathering(
            acc.plan_percentiles(plan.count, plan.factor, walker.values_exact_in_key_bins) if extras else None, device
        )
        for s, s_dirty in zip(slices(), dirty, strict=True):
            finite = s[torch.isfinite(s)] if s_dirty else s
            _pass2(finite, mean, acc.lo, scale, hist, sums)
            gathering.add(finite)
        acc.shift, acc.css = sums.tolist()
        acc.hist = hist.cpu().tolist()
        acc.percentiles = gathering.percentiles()
    walker.release()
    acc.digest = walker.digest() if extras else None
    return acc.result(info.numel, plan.count, plan.factor, mean)


class TorchGathering:
    """Pass 2's side of the percentiles with torch ops (``percentiles.py``): the wanted key bins'
    values copied to the host, or counted by the next 16 bits of their keys."""

    def __init__(self, plan: RankPlan | None, device: str) -> None:
        self.plan = plan
        self.parts: list[torch.Tensor] = []
        self.lut: torch.Tensor | None = None
        self.sub: torch.Tensor | None = None
        if plan is not None and not plan.exact_in_bins:
            self.lut = torch.frombuffer(bytearray(plan.lut), dtype=torch.uint8).to(device=device, dtype=torch.int64)
            if not plan.collect:
                self.sub = torch.zeros(len(plan.bins) * KEY_BINS, dtype=torch.int64, device=device)

    def add(self, finite: torch.Tensor) -> None:
        if self.lut is None:
            return
        top, following = torch_keys(finite)
        wanted = self.lut[top]
        mask = wanted > 0
        if self.sub is None:
            self.parts.append(finite[mask].to("cpu", torch.float64))
        else:
            self.sub += torch.bincount((wanted[mask] - 1) * KEY_BINS + following[mask], minlength=self.sub.numel())

    def percentiles(self) -> dict[str, float] | None:
        if self.plan is None:
            return None
        if self.plan.exact_in_bins:
            return self.plan.resolve_bins()
        if self.sub is not None:
            return self.plan.resolve_counted(self.sub.cpu().numpy())
        values = torch.cat(self.parts) if self.parts else torch.empty(0, dtype=torch.float64)
        return self.plan.resolve_collected(values.numpy())


def _values(walker: TensorWalker) -> Iterator[torch.Tensor]:
    for chunk in walker.chunks():
        yield chunk_values(chunk)


def _pass1(acc: Accumulator, s: torch.Tensor, keys: bool = True) -> bool:
    """Sum, min/max, non-zero, NaN and Inf counts of one slice; True when it held NaN/Inf."""
    acc.nonzero += int(torch.count_nonzero(s))
    total = float(s.sum(dtype=torch.float64))
    dirty = not math.isfinite(total)
    if dirty:
        nan = int(torch.isnan(s).sum())
        finite = s[torch.isfinite(s)]
        acc.nan += nan
        acc.inf += s.numel() - nan - finite.numel()
        s = finite
        total = float(s.sum(dtype=torch.float64))
    acc.is_double = s.dtype == torch.float64
    if keys:
        acc.keys += torch_key_counts(s)
    if s.numel():
        lo, hi = torch.aminmax(s)
        acc.lo, acc.hi = min(acc.lo, float(lo)), max(acc.hi, float(hi))
        acc.n += s.numel()
        acc.total += total
    return dirty


def _pass2(s: torch.Tensor, mean: float, lo: float, scale: float, hist: torch.Tensor, sums: torch.Tensor) -> None:
    """Centred sums and histogram counts of one slice of finite values."""
    s64 = s.to(torch.float64)
    d = s64 - mean
    sums[0] += d.sum()
    sums[1] += torch.dot(d, d)
    bins = (s64 - lo).mul_(scale).clamp_(0, HIST_BINS - 1).to(torch.int64)
    hist += torch.bincount(bins, minlength=HIST_BINS)
