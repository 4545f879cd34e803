"""The stats engine: fused, chunked, two-pass statistics over memory-mapped tensor bytes.

Each tensor is read zero-copy from an mmap of its file in chunks of ``CHUNK_ELEMENTS``.
Pass 1 gathers sum (float64), sum of squares, min/max and the non-zero count; NaN/Inf are
only counted when a chunk's sum shows they exist. Pass 2 gathers the centred sum of squares
(exact two-pass variance) and the histogram (sub/mul/clamp -> int32 -> bincount). Half,
bfloat16 and float8 chunks are upcast into a preallocated float32 buffer, integer and bool
chunks into a float64 one; no whole-tensor copy is ever made. Finished ranges of big tensors
are released with ``MADV_DONTNEED`` so resident memory stays flat whatever the file size.

Stride-0 (expanded) views are never expanded: stats run over the distinct elements and the
counts are scaled by the expansion factor, which gives the same result exactly.
"""

from __future__ import annotations

import math
import mmap
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.formats.model import DTYPES, TensorInfo

from .model import HIST_BINS, TensorStats

CHUNK_ELEMENTS = 1 << 20
RELEASE_BYTES = 16 << 20
_PAGE = mmap.PAGESIZE

_TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES if hasattr(torch, name)}

Progress = Callable[[int, int], None]


class StatsCancelled(Exception):
    pass


@dataclass(slots=True)
class _ViewPlan:
    """How to walk a tensor's distinct elements."""

    dense: bool  # the elements are one contiguous run of the storage
    start: int  # element offset of the run (dense) or of the view (strided)
    count: int  # distinct elements
    shape: tuple[int, ...]  # reduced view (stride-0 dims dropped), for strided walks
    stride: tuple[int, ...]
    factor: int  # how many times each distinct element appears in the logical tensor


def plan_view(info: TensorInfo) -> _ViewPlan:
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
    return _ViewPlan(dense, info.storage_offset, count, tuple(shape), tuple(stride), factor)


class _Buffers:
    """Per-thread scratch space, allocated once: upcast targets, differences, squares, bin ids."""

    def __init__(self) -> None:
        self.f32 = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
        self.f64 = torch.empty(CHUNK_ELEMENTS, dtype=torch.float64)
        self._diff = {d: torch.empty(CHUNK_ELEMENTS, dtype=d) for d in (torch.float32, torch.float64)}
        self._square = {d: torch.empty(CHUNK_ELEMENTS, dtype=d) for d in (torch.float32, torch.float64)}
        self.i32 = torch.empty(CHUNK_ELEMENTS, dtype=torch.int32)

    def scratch(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = c.numel()
        return self._diff[c.dtype][:n], self._square[c.dtype][:n]


class _TensorWalker:
    """Yields a tensor's distinct elements as 1-D compute chunks (float32 or float64)."""

    def __init__(self, mm: mmap.mmap, info: TensorInfo, plan: _ViewPlan, bufs: _Buffers) -> None:
        self.mm = mm
        self.info = info
        self.plan = plan
        self.bufs = bufs
        self.dtype = _TORCH_DTYPES[info.dtype]
        category = DTYPES[info.dtype].category
        if info.dtype in ("float32", "float64"):
            self.upcast: torch.Tensor | None = None
        elif category == "float":
            self.upcast = bufs.f32
        else:
            self.upcast = bufs.f64

    def _compute(self, raw: torch.Tensor) -> torch.Tensor:
        if self.upcast is None:
            return raw
        out = self.upcast[: raw.numel()]
        out.copy_(raw)
        return out

    def chunks(self) -> Iterator[torch.Tensor]:
        if self.plan.dense:
            yield from self._dense_chunks()
        else:
            yield from self._strided_chunks()

    def _dense_chunks(self) -> Iterator[torch.Tensor]:
        itemsize = self.info.itemsize
        base = self.info.storage.offset + self.plan.start * itemsize
        released = base - base % _PAGE
        done = 0
        while done < self.plan.count:
            n = min(CHUNK_ELEMENTS, self.plan.count - done)
            raw = torch.frombuffer(self.mm, dtype=self.dtype, count=n, offset=base + done * itemsize)
            yield self._compute(raw)
            del raw
            done += n
            end = base + done * itemsize
            if end - released >= RELEASE_BYTES:
                upto = end - end % _PAGE
                self.mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto
        end = base + done * itemsize
        upto = end - end % _PAGE
        if upto > released:
            self.mm.madvise(mmap.MADV_DONTNEED, released, upto - released)

    def _strided_chunks(self) -> Iterator[torch.Tensor]:
        storage = self.info.storage
        numel = storage.nbytes // self.info.itemsize
        flat = torch.frombuffer(self.mm, dtype=self.dtype, count=numel, offset=storage.offset)
        view = flat.as_strided(self.plan.shape, self.plan.stride, self.plan.start)
        rows = self.plan.shape[0]
        per_row = max(1, self.plan.count // rows)
        step = max(1, CHUNK_ELEMENTS // per_row)
        for i in range(0, rows, step):
            for raw in view[i : i + step].reshape(-1).split(CHUNK_ELEMENTS):
                yield self._compute(raw)


class _Accumulator:
    def __init__(self) -> None:
        self.n = 0  # finite values seen
        self.total = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.nonzero = 0
        self.nan = 0
        self.inf = 0
        self.css = 0.0  # centred sum of squares
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)

    def _finite_part(self, c: torch.Tensor, count: bool) -> torch.Tensor:
        finite = torch.isfinite(c)
        if count:
            nan = int(torch.isnan(c).sum())
            self.nan += nan
            self.inf += c.numel() - int(finite.sum()) - nan
        return c[finite]

    def pass1(self, c: torch.Tensor) -> bool:
        """Sum, min/max, non-zeros. Returns True when the chunk held NaN/Inf (pass 2 filters it)."""
        self.nonzero += int(torch.count_nonzero(c))
        s = float(c.sum(dtype=torch.float64))
        dirty = not math.isfinite(s)
        if dirty:
            c = self._finite_part(c, count=True)
            if c.numel() == 0:
                return True
            s = float(c.sum(dtype=torch.float64))
        lo, hi = torch.aminmax(c)
        self.n += c.numel()
        self.total += s
        self.lo = min(self.lo, float(lo))
        self.hi = max(self.hi, float(hi))
        return dirty

    def pass2(self, c: torch.Tensor, dirty: bool, mean: float, bufs: _Buffers) -> None:
        """Centred sum of squares (each square rounded once, summed in float64) and histogram."""
        if dirty:
            c = self._finite_part(c, count=False)
        n = c.numel()
        if n == 0:
            return
        diff, square = bufs.scratch(c)
        torch.sub(c, mean, out=diff)
        torch.mul(diff, diff, out=square)
        css = float(square.sum(dtype=torch.float64))
        if not math.isfinite(css):  # float32 squares overflowed
            d64 = c.to(torch.float64) - mean
            css = float(torch.dot(d64, d64))
        self.css += css
        if self.hi > self.lo:
            scale = HIST_BINS / (self.hi - self.lo)
            # (c - lo) * scale, computed from diff = c - mean
            diff.mul_(scale).add_((mean - self.lo) * scale).clamp_(0, HIST_BINS - 1)
            idx = bufs.i32[:n]
            idx.copy_(diff)
            self.hist += torch.bincount(idx, minlength=HIST_BINS)
        else:
            self.hist[0] += n

    def result(self, numel: int, distinct: int, factor: int) -> TensorStats:
        n = self.n * factor
        stats = TensorStats(
            numel=numel,
            zeros=(distinct - self.nonzero) * factor,
            nan=self.nan * factor,
            inf=self.inf * factor,
            hist=[int(v) * factor for v in self.hist.tolist()],
        )
        if self.n == 0:
            return stats
        mean = self.total / self.n
        stats.mean = mean
        stats.std = math.sqrt(self.css * factor / (n - 1)) if n > 1 else None
        stats.min, stats.max = self.lo, self.hi
        stats.l2 = math.sqrt((self.css + self.n * mean * mean) * factor)
        stats.absmax = max(abs(self.lo), abs(self.hi))
        stats.hist_min, stats.hist_max = self.lo, self.hi
        return stats


def tensor_stats(mm: mmap.mmap | None, info: TensorInfo, bufs: _Buffers | None = None) -> TensorStats:
    """Statistics of one tensor whose bytes lie in ``mm`` (the mmap of ``info.storage.path``)."""
    category = DTYPES[info.dtype].category
    if category == "complex" or info.dtype not in _TORCH_DTYPES:
        return TensorStats(numel=info.numel, note=f"statistics are not computed for {info.dtype} tensors")
    plan = plan_view(info)
    if info.numel == 0 or mm is None:
        return TensorStats(numel=info.numel)
    bufs = bufs or _Buffers()
    walker = _TensorWalker(mm, info, plan, bufs)
    acc = _Accumulator()
    dirty = [acc.pass1(c) for c in walker.chunks()]
    if acc.n:
        mean = acc.total / acc.n
        for c, chunk_dirty in zip(walker.chunks(), dirty, strict=True):
            acc.pass2(c, chunk_dirty, mean, bufs)
    return acc.result(info.numel, plan.count, plan.factor)


class _MappedFiles:
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


def compute_stats(
    tensors: Sequence[TensorInfo],
    *,
    workers: int = 2,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, TensorStats]:
    """Stats for every tensor, keyed by name. Tensors viewing the same data are computed once."""
    unique: dict[tuple[object, ...], TensorInfo] = {}
    for t in tensors:
        unique.setdefault(t.view_key, t)
    todo = sorted(unique.values(), key=lambda t: t.nbytes, reverse=True)
    total = sum(t.nbytes for t in todo)
    done = 0
    lock = threading.Lock()
    local = threading.local()
    maps = _MappedFiles()
    results: dict[tuple[object, ...], TensorStats] = {}

    def work(info: TensorInfo) -> None:
        nonlocal done
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        if not hasattr(local, "bufs"):
            local.bufs = _Buffers()
        stats = tensor_stats(maps.get(info.storage.path), info, local.bufs)
        with lock:
            results[info.view_key] = stats
            done += info.nbytes
            if progress is not None:
                progress(done, total)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer on a read-only mmap
            if workers <= 1:
                for info in todo:
                    work(info)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    for future in [pool.submit(work, info) for info in todo]:
                        future.result()
    finally:
        torch.set_num_threads(previous_threads)
        maps.close()
    return {t.name: results[t.view_key] for t in tensors}
