"""Walking a tensor's bytes: the view plan, chunked reads from a file mapping, and the running sums
every stats engine (the C kernel, the torch-op engine on the CPU or a device) accumulates into.

Each tensor is read zero-copy from an mmap of its file in chunks of ``CHUNK_ELEMENTS``. Half,
bfloat16 and float8 chunks are upcast into a preallocated float32 buffer, integer and bool chunks
into a float64 one; no whole-tensor copy is ever made. Finished ranges of big tensors are released
with ``MADV_DONTNEED`` so resident memory stays flat whatever the file size.

Stride-0 (expanded) views are never expanded: a walk covers the distinct elements and the counts
are scaled by the expansion factor, which gives the same result exactly.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ckptscope.formats.gguf_decoding import block_ranges, block_type, decode_into, undecodable_note
from ckptscope.formats.model import DTYPES, TensorInfo, contiguous_stride
from ckptscope.formats.tensor_views import row_blocks, storage_tensor

from . import digest as digests
from .model import HIST_BINS, LogHistogram, TensorStats
from .percentiles import RankPlan, log_histogram, new_key_counts, plan_ranks

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32: fewer Python round trips; the kernel streams it anyway
RELEASE_BYTES = 16 << 20  # big tensors give their pages back every 16 MiB, in each pass
WINDOW_BYTES = 64 << 20  # tensors up to this size are mapped once for both passes, released after
_PAGE = mmap.PAGESIZE

FEW_MANTISSA_BITS = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES if hasattr(torch, name)}


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
    if DTYPES[info.dtype].category == "complex" or info.dtype not in TORCH_DTYPES:
        return f"statistics are not computed for {info.dtype} tensors"
    if info.quant is not None:
        from .quantized import quantized_note

        return quantized_note(info, plan_view(info))
    return None


class Buffers:
    """Per-thread upcast targets, allocated once: Python-owned memory (``raw_*``) seen by torch
    as tensors, so a chunk written there can be handed to the kernel as a buffer."""

    def __init__(self) -> None:
        self.raw_f32 = bytearray(CHUNK_ELEMENTS * 4)
        self.raw_f64 = bytearray(CHUNK_ELEMENTS * 8)
        self.f32 = torch.frombuffer(self.raw_f32, dtype=torch.float32)
        self.f64 = torch.frombuffer(self.raw_f64, dtype=torch.float64)
        self.collect = bytearray()  # pass 2's copies of the values percentiles are selected from


class Chunk(NamedTuple):
    """Contiguous float32 or float64 values: as a tensor, and as the buffer holding exactly them."""

    values: torch.Tensor
    buffer: memoryview


class TensorWalker:
    """Yields a tensor's distinct elements as contiguous 1-D compute chunks (float32 or float64)."""

    def __init__(self, mm: mmap.mmap, info: TensorInfo, plan: ViewPlan, bufs: Buffers) -> None:
        self.mm = mm
        self.info = info
        self.plan = plan
        self.dtype = TORCH_DTYPES[info.dtype]
        category = DTYPES[info.dtype].category
        # where a chunk is written when it is not read in place: an upcast, or a strided gather
        if info.dtype == "float64" or category not in ("float",):
            self.target, self.raw_target = bufs.f64, bufs.raw_f64
        else:
            self.target, self.raw_target = bufs.f32, bufs.raw_f32
        self.in_place = info.dtype in ("float32", "float64")  # dense chunks are the file's own bytes
        # The digest is taken on the first walk where it sees the logical bytes in C order: a plain
        # tensor whose walk is row-major (not an expanded or permuted view); else ``digest()``
        # reads the tensor once more.
        self.hashes_in_walk = (
            info.plain and plan.factor == 1 and (not plan.dense or plan.stride == contiguous_stride(plan.shape))
        )
        self._digester = digests.new_digester(info) if self.hashes_in_walk else None
        self._digest: str | None = None

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
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the chunks this walker yields (float32 or float64)."""
        return self.target.dtype

    def _written(self, raw: torch.Tensor) -> Chunk:
        n = raw.numel()
        out = self.target[:n]
        out.copy_(raw)
        return Chunk(out, memoryview(self.raw_target)[: n * out.element_size()])

    def chunks(self) -> Iterator[Chunk]:
        if self.info.encoding is not None:
            yield from self._decoded_chunks()
        elif self.info.quant is not None:
            from .quantized import dequantized  # it builds on this module

            raw = self._dense_chunks() if self.plan.dense else self._strided_chunks()
            yield from dequantized(self.mm, self.info, raw)
        elif self.plan.dense:
            yield from self._dense_chunks()
            self._hashed_all()
        else:
            yield from self._strided_chunks()
            self._hashed_all()

    def _dense_chunks(self) -> Iterator[Chunk]:
        itemsize = self.info.itemsize
        base = self.info.storage.offset + self.plan.start * itemsize
        released = base - base % _PAGE
        release_each = self.plan.count * itemsize > WINDOW_BYTES
        done = 0
        while done < self.plan.count:
            n = min(CHUNK_ELEMENTS, self.plan.count - done)
            start = base + done * itemsize
            raw = torch.frombuffer(self.mm, dtype=self.dtype, count=n, offset=start)
            with memoryview(self.mm) as whole, whole[start : start + n * itemsize] as view:
                self._hash(view)
                if self.in_place:
                    yield Chunk(raw, view)
                else:
                    yield self._written(raw)
            del raw
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
        for first, count in block_ranges(self.info, CHUNK_ELEMENTS):
            n = decode_into(self.mm, self.info, first, count, self.raw_target)
            yield Chunk(self.target[:n], memoryview(self.raw_target)[: n * 4])
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
        view = storage_tensor(self.mm, self.info).as_strided(self.plan.shape, self.plan.stride, self.plan.start)
        for block in row_blocks(view, CHUNK_ELEMENTS):
            for raw in block.reshape(-1).split(CHUNK_ELEMENTS):  # type: ignore[no-untyped-call]
                if self._digester is not None:
                    self._hash(raw.contiguous().view(torch.uint8).numpy().data)
                yield self._written(raw)


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
                    self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            return self._maps[path]

    def close(self) -> None:
        for mm in self._maps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a tensor still views it; the GC will unmap it
                    pass
