"""Walking a tensor's bytes: the view plan, chunked reads from a file mapping, and the running sums
every stats engine (the C kernel, the torch-op engine on the CPU or a device) accumulates into.

Each tensor is read zero-copy from an mmap of its file in chunks of ``CHUNK_ELEMENTS`` elements of
its own dtype: the C kernel converts half, bfloat16, float8, integer and bool elements itself as it
reads them (the torch-op engine with torch), so the CPU path never imports torch and no chunk is
copied. A strided view's chunks are gathered (as raw bits, by numpy) into a per-thread buffer; a
GGUF block encoding is decoded, and a torch quantized tensor dequantized, into float32/float64
buffers. No whole-tensor copy is ever made. Finished ranges of big tensors are released with
``MADV_DONTNEED`` so resident memory stays flat whatever the file size, and the range ahead of a
big tensor's walk is asked for with ``MADV_WILLNEED`` (a file is opened ``POSIX_FADV_SEQUENTIAL``),
so on a cold page cache the disk reads ahead while the kernel computes.

Stride-0 (expanded) views are never expanded: a walk covers the distinct elements and the counts
are scaled by the expansion factor, which gives the same result exactly.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ckptscope.formats.array_views import gather_into, row_blocks, storage_array, strided_array
from ckptscope.formats.gguf_decoding import block_ranges, block_type, decode_into, undecodable_note
from ckptscope.formats.model import DTYPES, TensorInfo, contiguous_stride

from . import digest as digests
from .model import HIST_BINS, LogHistogram, TensorStats
from .percentiles import RankPlan, log_histogram, new_key_counts, plan_ranks

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32: fewer Python round trips; the kernel streams it anyway
RELEASE_BYTES = 16 << 20  # big tensors give their pages back every 16 MiB, in each pass
WINDOW_BYTES = 64 << 20  # tensors up to this size are mapped once for both passes, released after
READAHEAD_BYTES = 32 << 20  # how far ahead of a big tensor's walk its pages are asked for
_PAGE = mmap.PAGESIZE

FEW_MANTISSA_BITS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})
STATS_DTYPES = frozenset(name for name, d in DTYPES.items() if d.category != "complex")
"""The dtypes whose values get statistics."""


def computes_in_double(dtype: str) -> bool:
    """Whether a dtype's values are computed in float64 (float64, integers, bool) rather than
    float32 (float32, float16, bfloat16, float8): the C kernel's fixed rule, every engine's."""
    return dtype == "float64" or DTYPES[dtype].category != "float"


@dataclass(frozen=True, slots=True)
class ViewPlan:
    """How to walk a tensor's distinct elements."""

    dense: bool  # the elements are one contiguous run of the storage
    start: int  # element offset of the run (dense) or of the view (strided)
    count: int  # distinct elements
    shape: tuple[int, ...]  # reduced view (stride-0 dims dropped), for strided walks
    stride: tuple[int, ...]
    factor: int  # how many times each distinct element appears in the logical tensor


def plan_view(info: TensorInfo) -> ViewPlan:
    if info.encoding is not None:  # blocks that decode to the values, all of them, in order
        return ViewPlan(True, 0, info.numel, info.shape, contiguous_stride(info.shape), 1)
    factor = 1
    shape: list[int] = []
    stride: list[int] = []
    for size, st in zip(info.shape, info.stride, strict=True):
        if size == 1:
            continue
        if st == 0:
            factor *= size
            continue
        shape.append(size)
        stride.append(st)
    count = math.prod(shape)
    expected = 1
    dense = True
    for size, st in sorted(zip(shape, stride, strict=True), key=lambda p: p[1]):
        if st != expected:
            dense = False
            break
        expected *= size
    return ViewPlan(dense, info.storage_offset, count, tuple(shape), tuple(stride), factor)


def unsupported_note(info: TensorInfo) -> str | None:
    """Why no statistics are computed for this tensor's dtype, if they are not."""
    if info.encoding is not None:
        return undecodable_note(info)
    if info.dtype not in STATS_DTYPES:
        return f"statistics are not computed for {info.dtype} tensors"
    if info.quant is not None:
        from .quantized import quantized_note

        return quantized_note(info, plan_view(info))
    return None


class Buffers:
    """Per-thread buffers, allocated once: where a chunk is written when it is not read in place
    (a strided gather of raw elements, decoded float32 values, dequantized float64 ones)."""

    def __init__(self) -> None:
        self.raw_f32 = bytearray(CHUNK_ELEMENTS * 4)
        self.raw_f64 = bytearray(CHUNK_ELEMENTS * 8)
        self.raw_gather = bytearray(CHUNK_ELEMENTS * 8)  # raw elements of any stats dtype
        self.collect = bytearray()  # pass 2's copies of the values percentiles are selected from


class Chunk(NamedTuple):
    """``n`` consecutive elements of ``dtype`` (the file's own, or float32/float64 after a decode
    or dequantization), as the buffer holding exactly them."""

    buffer: memoryview
    n: int
    dtype: str

    @property
    def is_double(self) -> bool:
        """The chunk's values are computed in float64 (their keys are 64-bit)."""
        return computes_in_double(self.dtype)


class TensorWalker:
    """Yields a tensor's distinct elements as contiguous 1-D chunks of raw elements.

    ``hashing``: whether the walk also takes the tensor's content digest (off for the moments
    and histogram alone)."""

    def __init__(self, mm: mmap.mmap, info: TensorInfo, plan: ViewPlan, bufs: Buffers, hashing: bool = True) -> None:
        self.mm = mm
        self.info = info
        self.plan = plan
        self.bufs = bufs
        # The digest is taken on the first walk where it sees the logical bytes in C order: a plain
        # tensor whose walk is row-major (not an expanded or permuted view); else ``digest()``
        # reads the tensor once more.
        self.hashes_in_walk = (
            hashing
            and info.plain
            and plan.factor == 1
            and (not plan.dense or plan.stride == contiguous_stride(plan.shape))
        )
        self._digester = digests.new_digester(info) if self.hashes_in_walk else None
        self._digest: str | None = None
        self._ahead = 0  # the end of the range asked for with MADV_WILLNEED

    def digest(self) -> str:
        """The tensor's content digest (after a first complete walk, or reading it now)."""
        if self._digest is None:
            self._digest = digests.tensor_digest(self.info)
        return self._digest

    def _hash(self, data: memoryview | bytes) -> None:
        if self._digester is not None:
            self._digester.update(data)

    def _hashed_all(self) -> None:
        if self._digester is not None:
            self._digest = digests.finish(self._digester)
            self._digester = None

    @property
    def values_exact_in_key_bins(self) -> bool:
        """The chunks' float32 values have at most 7 mantissa bits (bfloat16, float8 files): the top
        16 bits of a key are the whole value."""
        return self.info.plain and self.info.dtype in FEW_MANTISSA_BITS

    @property
    def compute_double(self) -> bool:
        """The walk's values are computed in float64 (else float32)."""
        if self.info.encoding is not None:
            return False
        if self.info.quant is not None:
            return True
        return computes_in_double(self.info.dtype)

    def chunks(self) -> Iterator[Chunk]:
        if self.info.encoding is not None:
            yield from self._decoded_chunks()
        elif self.info.quant is not None:
            from .quantized import dequantized  # it builds on this module

            raw = self._dense_chunks() if self.plan.dense else self._strided_chunks()
            yield from dequantized(self.mm, self.info, raw, self.bufs)
        elif self.plan.dense:
            yield from self._dense_chunks()
            self._hashed_all()
        else:
            yield from self._strided_chunks()
            self._hashed_all()

    def _read_ahead(self, at: int, end: int) -> None:
        """Ask for the pages from ``at`` up to READAHEAD_BYTES ahead (never past ``end``), a window
        at a time, so the disk reads the next part while this one is computed."""
        if self._ahead >= end or at + READAHEAD_BYTES // 2 < self._ahead:
            return
        start = max(at, self._ahead)
        start -= start % _PAGE
        stop = min(end, start + READAHEAD_BYTES)
        if stop > start:
            self.mm.madvise(mmap.MADV_WILLNEED, start, stop - start)
        self._ahead = stop

    def _dense_chunks(self) -> Iterator[Chunk]:
        itemsize = self.info.itemsize
        dtype = self.info.dtype
        base = self.info.storage.offset + self.plan.start * itemsize
        end_all = base + self.plan.count * itemsize
        released = base - base % _PAGE
        release_each = self.plan.count * itemsize > WINDOW_BYTES
        self._ahead = 0
        done = 0
        with memoryview(self.mm) as whole:
            while done < self.plan.count:
                n = min(CHUNK_ELEMENTS, self.plan.count - done)
                start = base + done * itemsize
                if release_each:
                    self._read_ahead(start, end_all)
                with whole[start : start + n * itemsize] as view:
                    self._hash(view)
                    yield Chunk(view, n, dtype)
                done += n
                end = base + done * itemsize
                if release_each and end - released >= RELEASE_BYTES:
                    upto = end - end % _PAGE
                    self.mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
                    released = upto
        if release_each:
            self.release()

    def _decoded_chunks(self) -> Iterator[Chunk]:
        """Encoded blocks decoded into the float32 buffer, about CHUNK_ELEMENTS values at a time."""
        storage, block_bytes = self.info.storage, block_type(self.info).type_size
        released = storage.offset - storage.offset % _PAGE
        release_each = storage.nbytes > WINDOW_BYTES
        raw = self.bufs.raw_f32
        for first, count in block_ranges(self.info, CHUNK_ELEMENTS):
            n = decode_into(self.mm, self.info, first, count, raw)
            with memoryview(raw) as whole, whole[: n * 4] as view:
                yield Chunk(view, n, "float32")
            end = storage.offset + (first + count) * block_bytes
            if release_each and end - released >= RELEASE_BYTES:
                upto = end - end % _PAGE
                self.mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto
        if release_each:
            self.release()

    def release(self) -> None:
        """Give the tensor's pages back (its whole range, whole pages only)."""
        if not self.plan.dense:
            return
        itemsize = self.info.itemsize
        start = self.info.storage.offset + self.plan.start * itemsize
        end = start + self.plan.count * itemsize
        if self.info.encoding is not None:
            start, end = self.info.storage.offset, self.info.storage.offset + self.info.storage.nbytes
        start -= start % _PAGE
        end -= end % _PAGE
        if end > start:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _strided_chunks(self) -> Iterator[Chunk]:
        """The view's distinct elements in C order, gathered (as raw bits) into the buffer."""
        view = strided_array(storage_array(self.mm, self.info), self.plan.start, self.plan.shape, self.plan.stride)
        out = self.bufs.raw_gather
        for block in row_blocks(view, CHUNK_ELEMENTS):
            with gather_into(block, out) as gathered:
                self._hash(gathered)
                yield Chunk(gathered, block.size, self.info.dtype)
        del view


class Accumulator:
    """The running sums of one tensor. Pass 1 gathers the float64 sum, min/max, non-zero, NaN and
    Inf counts, giving a provisional mean m; pass 2 sums (x - m) and (x - m)^2 in float64, which
    corrects the mean exactly and gives the variance without cancellation, and fills the
    histogram. Each engine fills these fields its own way; ``result`` is shared."""

    def __init__(self) -> None:
        self.n = 0  # finite values seen
        self.total = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.nonzero = 0
        self.nan = 0
        self.inf = 0
        self.css = 0.0  # sum of (x - m)^2 around the provisional mean m
        self.shift = 0.0  # sum of (x - m)
        self.hist = [0] * HIST_BINS
        self.is_double = False  # the chunks are float64 (their keys are 64-bit)
        self.keys = new_key_counts()  # pass 1: values by the top 16 bits of their key (percentiles.py)
        self.plan: RankPlan | None = None  # pass 2's part in the percentiles, from ``plan_percentiles``
        self.percentiles: dict[str, float] | None = None
        self.log_hist: LogHistogram | None = None
        self.digest: str | None = None

    def plan_percentiles(self, distinct: int, factor: int, exact_in_bins: bool = False) -> RankPlan | None:
        """After pass 1: the log-magnitude histogram, and which bins pass 2 gathers for the
        percentiles (None: no finite value). ``distinct`` is the number of distinct elements."""
        if self.n == 0:
            return None
        self.log_hist = log_histogram(self.keys, self.is_double, distinct - self.nonzero, factor)
        self.plan = plan_ranks(self.keys, factor, self.is_double, exact_in_bins=exact_in_bins and not self.is_double)
        return self.plan

    def hist_scale(self) -> float:
        """Bins per unit: (x - lo) * scale lies in [0, 64]. The cap keeps it finite when hi - lo is
        denormal-small; a constant tensor puts everything in bin 0."""
        return min(HIST_BINS / (self.hi - self.lo), 1e300) if self.hi > self.lo else 0.0

    def result(self, numel: int, distinct: int, factor: int, provisional_mean: float) -> TensorStats:
        n = self.n * factor
        bins = self.hist
        stats = TensorStats(
            numel=numel,
            zeros=(distinct - self.nonzero) * factor,
            nan=self.nan * factor,
            inf=self.inf * factor,
            hist=[int(v) * factor for v in bins],
            percentiles=self.percentiles,
            log_hist=self.log_hist,
            digest=self.digest,
        )
        if self.n == 0:
            return stats
        delta = self.shift / self.n
        mean = provisional_mean + delta
        css = max(self.css - self.n * delta * delta, 0.0)
        stats.mean = mean
        stats.std = math.sqrt(css * factor / (n - 1)) if n > 1 else None
        stats.min, stats.max = self.lo, self.hi
        stats.l2 = math.sqrt((css + self.n * mean * mean) * factor)
        stats.absmax = max(abs(self.lo), abs(self.hi))
        stats.hist_min, stats.hist_max = self.lo, self.hi
        return stats


class MappedFiles:
    """One read-only mmap per file, opened on first use, closed together."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap | None] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> mmap.mmap | None:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as fh:
                    size = fh.seek(0, 2)
                    if size and hasattr(os, "posix_fadvise"):  # a larger readahead window for the faults
                        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            return self._maps[path]

    def close(self) -> None:
        for mm in self._maps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a tensor still views it; the GC will unmap it
                    pass
