"""Exact percentiles and the log-magnitude histogram from order-preserving keys, shared by every
engine.

A float's bits, with the sign folded (every bit flipped for a negative value, only the sign bit
for a positive one), compare as unsigned integers exactly as the values compare: that is the
value's key. NaN and Inf get keys of their own, above and below every finite value.

Pass 1 counts a tensor's values by the top 16 bits of their keys (``KEY_BINS`` bins: sign,
exponent and the first mantissa bits). That says which bin holds each order statistic a
percentile needs (``plan_ranks``). Pass 2 then copies the values of just those bins (at most
18 bins: the two order statistics either side of each of the nine percentiles), which are
selected from exactly (``RankPlan.resolve``); where they would not fit in ``COLLECT_VALUES``
values, it counts them by the next 16 bits of their keys instead, which pins a float32 value
exactly and a float64 value to 32 of its 64 bits (a relative 2**-21). So the percentiles are
exact (the order statistics, interpolated linearly like ``torch.quantile``) for every float32
computation and for float64 ones up to ``COLLECT_VALUES`` values in the wanted bins, and never
cost a third pass over the data.

The same bins give the log-magnitude histogram (``log_histogram``): the count of values per
sign and binary exponent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .model import PERCENTILES, LogHistogram

KEY_BINS = 1 << 16
COLLECT_VALUES = 1 << 21  # values of the wanted bins copied in pass 2 (8 MiB of float32 per worker)
# the decimal fractions themselves (99.9 / 100 is 0.9990000000000001, not 0.999)
QUANTILES: tuple[float, ...] = tuple(float(f"{p}e-2") for p in PERCENTILES)

# The finite keys' top-16-bit bins (below: -Inf and negative NaNs; above: +Inf and NaNs).
_FINITE_F32 = (0x0080, 0xFF7F)
_FINITE_F64 = (0x0010, 0xFFEF)


def finite_bins(is_double: bool) -> tuple[int, int]:
    """The first and last key bin of finite values (inclusive)."""
    return _FINITE_F64 if is_double else _FINITE_F32


def new_key_counts() -> np.ndarray:
    return np.zeros(KEY_BINS, dtype=np.int64)


def finite_key_counts(counts: np.ndarray, is_double: bool) -> np.ndarray:
    """``counts`` with the NaN and Inf bins cleared."""
    first, last = finite_bins(is_double)
    out = counts.copy()
    out[:first] = 0
    out[last + 1 :] = 0
    return out


@dataclass(slots=True)
class RankPlan:
    """Which order statistics the percentiles need, where they lie, and what pass 2 gathers."""

    is_double: bool
    total: int  # finite values of the logical tensor (distinct values times the expansion factor)
    factor: int
    ranks: list[int]  # order statistics (0-based, among the distinct finite values), ascending
    rank_bins: list[int]  # the key bin of each rank
    bins: list[int]  # the wanted bins, ascending; bin bins[t - 1] is marked t in ``lut``
    before: dict[int, int]  # values in bins below each wanted bin
    counts: dict[int, int]  # values in each wanted bin
    lut: bytes  # KEY_BINS bytes: 0, or the wanted bin's number (1-based); empty: nothing to gather
    collect: bool  # copy the wanted bins' values (True) or count them by their next 16 key bits
    exact_in_bins: bool = False  # every value is its bin's lowest key (bfloat16, float8): no gathering

    def resolve_bins(self) -> dict[str, float]:
        """Percentiles from pass 1's bins alone, where a bin holds one value (``exact_in_bins``)."""
        # the value's low 16 bits are zero: in its key, zero for a positive value, ones for a negative
        return self._interpolated(
            {
                r: _key_value(b, 0 if b >= 0x8000 else 0xFFFF, self.is_double)
                for r, b in zip(self.ranks, self.rank_bins, strict=True)
            }
        )

    @property
    def wanted(self) -> int:
        return sum(self.counts.values())

    def collect_buffer(self, reuse: bytearray | None = None) -> bytearray:
        """Room for the wanted bins' values (plus one: the kernel's store-then-advance loop), in a
        whole number of float64 values so that a reused buffer fits either width."""
        size = (self.wanted + 1) * 8
        if reuse is not None and len(reuse) >= size and len(reuse) % 8 == 0:
            return reuse
        return bytearray(size)

    def sub_counts(self) -> np.ndarray:
        return np.zeros(len(self.bins) * KEY_BINS, dtype=np.int64)

    def resolve_collected(self, values: np.ndarray) -> dict[str, float] | None:
        """Percentiles from the wanted bins' values (in any order); None when their number is not
        what pass 1 counted (the file changed between the passes)."""
        if values.size != self.wanted:
            return None
        # selected in the values' own dtype (float32 values are float64 values exactly)
        wanted_below = {}
        seen = 0
        for b in self.bins:
            wanted_below[b] = seen
            seen += self.counts[b]
        local = [r - self.before[b] + wanted_below[b] for r, b in zip(self.ranks, self.rank_bins, strict=True)]
        ordered = np.partition(values, sorted(set(local))) if values.size else values
        return self._interpolated({r: float(ordered[i]) for r, i in zip(self.ranks, local, strict=True)})

    def resolve_counted(self, sub: np.ndarray) -> dict[str, float] | None:
        """Percentiles from the wanted bins' counts by the next 16 key bits; None when they do not
        add up to pass 1's counts."""
        rows = sub.reshape(len(self.bins), KEY_BINS)
        cums = {}
        for t, b in enumerate(self.bins):
            cum = np.cumsum(rows[t])
            if int(cum[-1]) != self.counts[b]:
                return None
            cums[b] = cum
        found: dict[int, float] = {}
        for r, b in zip(self.ranks, self.rank_bins, strict=True):
            low = int(np.searchsorted(cums[b], r - self.before[b], side="right"))
            found[r] = _key_value(b, low, self.is_double)
        return self._interpolated(found)

    def _interpolated(self, value_at: dict[int, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, q in zip(PERCENTILES, QUANTILES, strict=True):
            lo, hi, frac = _positions(q, self.total)
            a = value_at[lo // self.factor]
            b = value_at[hi // self.factor]
            out[name] = a if frac == 0.0 or a == b else a + frac * (b - a)
        return out


def _positions(q: float, total: int) -> tuple[int, int, float]:
    """The two order statistics a quantile interpolates between, and the weight of the second."""
    pos = q * (total - 1)
    lo = math.floor(pos)
    return lo, min(lo + 1, total - 1), pos - lo


def plan_ranks(
    counts: np.ndarray,
    factor: int,
    is_double: bool,
    collect_limit: int | None = None,
    exact_in_bins: bool = False,
) -> RankPlan | None:
    """The plan for pass 2 from pass 1's key counts (of the distinct values); None when there is no
    finite value. ``exact_in_bins``: the values have at most 7 mantissa bits in float32 (bfloat16,
    float8), so a bin's key is its only value and pass 2 gathers nothing."""
    finite = finite_key_counts(counts, is_double)
    cum = np.cumsum(finite)
    distinct = int(cum[-1])
    if distinct == 0:
        return None
    total = distinct * factor
    ranks: set[int] = set()
    for q in QUANTILES:
        lo, hi, _ = _positions(q, total)
        ranks.update((lo // factor, hi // factor))
    ordered = sorted(ranks)
    rank_bins = [int(b) for b in np.searchsorted(cum, ordered, side="right")]
    bins = sorted(set(rank_bins))
    lut = bytearray(0 if exact_in_bins else KEY_BINS)
    for t, b in enumerate(bins if not exact_in_bins else (), start=1):
        lut[b] = t
    before = {b: int(cum[b] - finite[b]) for b in bins}
    in_bin = {b: int(finite[b]) for b in bins}
    return RankPlan(
        is_double,
        total,
        factor,
        ordered,
        rank_bins,
        bins,
        before,
        in_bin,
        bytes(lut),
        collect=sum(in_bin.values()) <= (COLLECT_VALUES if collect_limit is None else collect_limit),
        exact_in_bins=exact_in_bins,
    )


def _key_value(top: int, next16: int, is_double: bool) -> float:
    """The value of a key known by its top 32 bits (a float64's remaining bits: the middle)."""
    if is_double:
        key = (top << 48) | (next16 << 32) | 0x80000000
        bits = key ^ (1 << 63) if key >> 63 else ~key & ((1 << 64) - 1)
        return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])
    key = (top << 16) | next16
    bits = key ^ (1 << 31) if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def log_histogram(counts: np.ndarray, is_double: bool, zeros: int, factor: int) -> LogHistogram | None:
    """Counts by sign and binary exponent from the key counts of the distinct values; ``zeros`` is
    the number of distinct zero values. Subnormals count at the smallest normal exponent minus one.

    A key bin's top bits are the sign and the exponent field, so each exponent is a run of
    consecutive bins (128 for float32 keys, 16 for float64): positive values upwards from bin
    0x8000, negative ones downwards from 0x7FFF."""
    finite = finite_key_counts(counts, is_double)
    if not finite.any():
        return None
    run, bias = (16, 1023) if is_double else (128, 127)
    # +0 has the key bin 0x8000, -0 the bin 0x7FFF; beside them there only the very smallest
    # subnormals (below 2**-133 in float32, 2**-1026 in float64), so the zeros are taken there
    finite[0x8000] -= (plus := min(zeros, int(finite[0x8000])))
    finite[0x7FFF] -= min(zeros - plus, int(finite[0x7FFF]))
    pos = finite[0x8000:].reshape(-1, run).sum(axis=1)
    neg = finite[:0x8000].reshape(-1, run).sum(axis=1)[::-1]

    def by_exponent(c: np.ndarray) -> dict[int, int]:
        return {(int(f) - bias if f else -bias): int(c[f]) * factor for f in np.flatnonzero(c)}

    return LogHistogram(neg=by_exponent(neg), zero=zeros * factor, pos=by_exponent(pos))
