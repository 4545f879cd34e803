"""The C kernel engine: each chunk of a walk goes through the kernel's two fused loops (GIL
released), which read the chunk's elements in their own dtype (bfloat16, float16, float8, integers
and bool converted as they are read; no torch, no copy): pass 1 gathers the float64 sum, min/max,
the non-zero count (NaN/Inf are only looked for when the sum shows they exist) and the key bins
the percentiles start from; pass 2 the centred
sums, the histogram and the values the percentiles are selected from (``percentiles.py``). The
walk hashes the bytes it reads for the tensor's digest.

The kernel is an optional extension (``_kernel.c``, built by ``setup.py`` where a C compiler
exists). ``load_kernel`` says whether this process can use it, and why not.
"""

from __future__ import annotations

import hashlib
import importlib
import mmap
from array import array
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np

from ckptscope.formats.model import TensorInfo

from .model import HIST_BINS, TensorStats
from .percentiles import RankPlan
from .walk import Accumulator, Buffers, Chunk, TensorWalker, plan_view, unsupported_note

EMPTY = bytearray()

SOURCE = Path(__file__).with_name("_kernel.c")


Kernel = ModuleType  # the module ckptscope.stats._kernel (typed in _kernel.pyi)


@cache
def load_kernel() -> tuple[Kernel | None, str]:
    """The kernel module, or None with the reason it cannot be used (not built, or built from an
    older ``_kernel.c`` than the one beside it, as after editing the source of an editable
    install)."""
    try:
        kernel = importlib.import_module("ckptscope.stats._kernel")
    except ImportError as exc:
        return None, f"the C kernel is not built ({exc}); install a C compiler and reinstall ckptscope"
    built_from = getattr(kernel, "SOURCE_SHA256", "unknown")
    if SOURCE.exists() and built_from != hashlib.sha256(SOURCE.read_bytes()).hexdigest():
        return None, "the C kernel was built from an older _kernel.c; reinstall ckptscope (pip install -e .) to rebuild"
    return kernel, "the C kernel"


NO_KEYS = bytearray()  # pass 1 without the key bins (the moments and histogram alone)


def _pass1(kernel: Kernel, acc: Accumulator, c: Chunk, keys: bool = True) -> bool:
    """Returns True when the chunk held NaN/Inf (pass 2 then skips them). ``keys``: also count the
    values' key bins (for the percentiles and the log-magnitude histogram)."""
    acc.is_double = c.is_double
    finite, total, lo, hi, nonzero, nan, inf = kernel.pass1(
        c.buffer, c.n, kernel.DTYPES[c.dtype], acc.keys if keys else NO_KEYS
    )
    acc.nonzero += nonzero
    acc.nan += nan
    acc.inf += inf
    if finite:
        acc.n += finite
        acc.total += total
        acc.lo = min(acc.lo, lo)
        acc.hi = max(acc.hi, hi)
    return bool(finite != c.n)


class Gathering:
    """Pass 2's side of the percentiles: the wanted key bins' values copied (or counted) chunk by
    chunk, then the percentiles selected from them."""

    def __init__(self, plan: RankPlan | None, bufs: Buffers) -> None:
        self.plan = plan
        self.bufs = bufs
        self.count = 0
        self.lut: bytes = b"" if plan is None else plan.lut
        self.out = EMPTY
        self.sub = EMPTY
        self._sub: np.ndarray | None = None
        if plan is not None and plan.exact_in_bins:
            pass  # nothing to gather
        elif plan is not None and plan.collect:
            self.out = bufs.collect = plan.collect_buffer(bufs.collect)
        elif plan is not None:
            self._sub = plan.sub_counts()
            self.sub = self._sub  # type: ignore[assignment]  # a writable int64 buffer

    def percentiles(self) -> dict[str, float] | None:
        plan = self.plan
        if plan is None or self.count < 0:
            return None
        if plan.exact_in_bins:
            return plan.resolve_bins()
        if self._sub is not None:
            return plan.resolve_counted(self._sub)
        values = np.frombuffer(self.out, dtype=np.float64 if plan.is_double else np.float32, count=self.count)
        return plan.resolve_collected(values)


SEEDED_MIN = 1 << 17
"""Elements from which a histogram seeded from the key bins pays: reading 65,536 key bins costs
about what binning this many values does."""


def new_histogram(
    kernel: Kernel, acc: Accumulator, walker: TensorWalker, keyed: bool, numel: int
) -> tuple[array[int], bool]:
    """Pass 2's histogram and whether it is already filled: where pass 1 counted the key bins
    (``keyed``) of values that are their key bins' own (bfloat16, float8:
    ``values_exact_in_key_bins``) and there are enough of them, it comes filled from those key
    bins (``_kernel.hist_of_keys``) and pass 2 has none of the histogram's work; else empty."""
    hist = array("q", bytes(8 * HIST_BINS))
    if not (keyed and numel >= SEEDED_MIN and walker.values_exact_in_key_bins):
        return hist, False
    kernel.hist_of_keys(acc.keys, kernel.DTYPES[walker.info.dtype], acc.lo, acc.hist_scale(), hist)
    return hist, True


def _pass2(
    kernel: Kernel,
    acc: Accumulator,
    c: Chunk,
    dirty: bool,
    mean: float,
    hist: array[int],
    g: Gathering,
    from_keys: bool = False,
) -> None:
    """``from_keys``: ``hist`` came filled from the key bins (``new_histogram``); only the sums
    and the percentiles' values are gathered."""
    code = kernel.DTYPES[c.dtype]
    shift, css, g.count = kernel.pass2(
        c.buffer, c.n, code, dirty, mean, acc.lo, acc.hist_scale(), hist, g.lut, g.out, g.count, g.sub, from_keys
    )
    acc.shift += shift
    acc.css += css


def tensor_stats_with_kernel(
    kernel: Kernel, mm: mmap.mmap | None, info: TensorInfo, bufs: Buffers | None = None, extras: bool = True
) -> TensorStats:
    """Statistics of one tensor whose bytes lie in ``mm`` (the mmap of ``info.storage.path``).
    ``extras``: also the percentiles, the log-magnitude histogram and the digest (else the moments,
    counts and histogram alone)."""
    note = unsupported_note(info)
    if note is not None:
        return TensorStats(numel=info.numel, note=note)
    plan = plan_view(info)
    if info.numel == 0 or mm is None:
        return TensorStats(numel=info.numel)
    bufs = bufs or Buffers()
    walker = TensorWalker(mm, info, plan, bufs, hashing=extras)
    acc = Accumulator()
    acc.is_double = walker.compute_double
    dirty = [_pass1(kernel, acc, c, extras) for c in walker.chunks()]
    mean = acc.total / acc.n if acc.n else 0.0
    if acc.n:
        rank_plan = acc.plan_percentiles(plan.count, plan.factor, walker.values_exact_in_key_bins) if extras else None
        gathering = Gathering(rank_plan, bufs)
        hist, from_keys = new_histogram(kernel, acc, walker, extras, info.numel)
        for c, chunk_dirty in zip(walker.chunks(), dirty, strict=True):
            _pass2(kernel, acc, c, chunk_dirty, mean, hist, gathering, from_keys)
        acc.hist = hist.tolist()
        acc.percentiles = gathering.percentiles()
    walker.release()
    acc.digest = walker.digest() if extras else None
    return acc.result(info.numel, plan.count, plan.factor, mean)
