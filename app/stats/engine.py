"""The stats engine: fused, chunked, two-pass statistics over memory-mapped tensor bytes.

Each tensor is read zero-copy from an mmap of its file in chunks of ``CHUNK_ELEMENTS``, and each
chunk goes through the two fused loops of the C kernel (``_kernel.c``, GIL released): pass 1
gathers the float64 sum, min/max and the non-zero count (NaN/Inf are only looked for when the
sum shows they exist); pass 2 the centred sums (exact two-pass variance) and the histogram. Half,
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
from app.formats.tensor_views import row_blocks, storage_tensor

from . import _kernel
from .device_engine import tensor_stats_on_device
from .model import HIST_BINS, TensorStats

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32: fewer Python round trips; the kernel streams it anyway
RELEASE_BYTES = 16 << 20  # big tensors give their pages back every 16 MiB, in each pass
WINDOW_BYTES = 64 << 20  # tensors up to this size are mapped once for both passes, released after
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
    """Per-thread upcast targets, allocated once."""

    def __init__(self) -> None:
        self.f32 = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)
        self.f64 = torch.empty(CHUNK_ELEMENTS, dtype=torch.float64)


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

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the chunks this walker yields (float32 or float64)."""
        return self.dtype if self.upcast is None else self.upcast.dtype

    def _compute(self, raw: torch.Tensor) -> torch.Tensor:
        if self.upcast is None:
            return raw if raw.is_contiguous() else raw.contiguous()  # the kernel reads raw memory
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
        release_each = self.plan.count * itemsize > WINDOW_BYTES
        done = 0
        while done < self.plan.count:
            n = min(CHUNK_ELEMENTS, self.plan.count - done)
            raw = torch.frombuffer(self.mm, dtype=self.dtype, count=n, offset=base + done * itemsize)
            yield self._compute(raw)
            del raw
            done += n
            end = base + done * itemsize
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
        start -= start % _PAGE
        end -= end % _PAGE
        if end > start:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _strided_chunks(self) -> Iterator[torch.Tensor]:
        view = storage_tensor(self.mm, self.info).as_strided(self.plan.shape, self.plan.stride, self.plan.start)
        for block in row_blocks(view, CHUNK_ELEMENTS):
            for raw in block.reshape(-1).split(CHUNK_ELEMENTS):
                yield self._compute(raw)


class _Accumulator:
    """Pass 1 (C kernel) takes the float64 sum, min/max, non-zero, NaN and Inf counts, giving a
    provisional mean m; pass 2 sums (x - m) and (x - m)^2 in float64, which corrects the mean
    exactly and gives the variance without cancellation, and fills the histogram."""

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
        self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)

    def pass1(self, c: torch.Tensor) -> bool:
        """Returns True when the chunk held NaN/Inf (pass 2 then skips them)."""
        finite, total, lo, hi, nonzero, nan, inf = _kernel.pass1(c.data_ptr(), c.numel(), c.dtype == torch.float64)
        self.nonzero += nonzero
        self.nan += nan
        self.inf += inf
        if finite:
            self.n += finite
            self.total += total
            self.lo = min(self.lo, lo)
            self.hi = max(self.hi, hi)
        return finite != c.numel()

    def hist_scale(self) -> float:
        """Bins per unit: (x - lo) * scale lies in [0, 64]. The cap keeps it finite when hi - lo is
        denormal-small; a constant tensor puts everything in bin 0."""
        return min(HIST_BINS / (self.hi - self.lo), 1e300) if self.hi > self.lo else 0.0

    def pass2(self, c: torch.Tensor, dirty: bool, mean: float) -> None:
        shift, css = _kernel.pass2(
            c.data_ptr(),
            c.numel(),
            c.dtype == torch.float64,
            dirty,
            mean,
            self.lo,
            self.hist_scale(),
            self.hist.data_ptr(),
        )
        self.shift += shift
        self.css += css

    def result(self, numel: int, distinct: int, factor: int, provisional_mean: float) -> TensorStats:
        n = self.n * factor
        bins = self.hist.tolist()
        stats = TensorStats(
            numel=numel,
            zeros=(distinct - self.nonzero) * factor,
            nan=self.nan * factor,
            inf=self.inf * factor,
            hist=[int(v) * factor for v in bins],
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


def unsupported_note(info: TensorInfo) -> str | None:
    """Why no statistics are computed for this tensor's dtype, if they are not."""
    if DTYPES[info.dtype].category == "complex" or info.dtype not in _TORCH_DTYPES:
        return f"statistics are not computed for {info.dtype} tensors"
    return None


def tensor_stats(mm: mmap.mmap | None, info: TensorInfo, bufs: _Buffers | None = None) -> TensorStats:
    """Statistics of one tensor whose bytes lie in ``mm`` (the mmap of ``info.storage.path``)."""
    note = unsupported_note(info)
    if note is not None:
        return TensorStats(numel=info.numel, note=note)
    plan = plan_view(info)
    if info.numel == 0 or mm is None:
        return TensorStats(numel=info.numel)
    bufs = bufs or _Buffers()
    walker = _TensorWalker(mm, info, plan, bufs)
    acc = _Accumulator()
    dirty = [acc.pass1(c) for c in walker.chunks()]
    mean = acc.total / acc.n if acc.n else 0.0
    if acc.n:
        for c, chunk_dirty in zip(walker.chunks(), dirty, strict=True):
            acc.pass2(c, chunk_dirty, mean)
    walker.release()
    return acc.result(info.numel, plan.count, plan.factor, mean)


SMALL_ELEMENTS = 16384  # tensors up to this size are summarised in batches
BATCH_ELEMENTS = 1 << 18


def _batchable(info: TensorInfo) -> bool:
    if not 0 < info.numel <= SMALL_ELEMENTS or info.dtype not in _TORCH_DTYPES:
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
        out.append(stats)
    return out


def _range(mm: mmap.mmap, dtype: str, start: int, end: int) -> torch.Tensor:
    itemsize = DTYPES[dtype].itemsize
    return torch.frombuffer(mm, dtype=_TORCH_DTYPES[dtype], count=(end - start) // itemsize, offset=start)


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
    device: str | None = None,
) -> dict[str, TensorStats]:
    """Stats for every tensor, keyed by name. Tensors viewing the same data are computed once.
    ``device``: None for the host kernel, or a torch device (``"cuda"``) for device_engine."""
    unique: dict[tuple[object, ...], TensorInfo] = {}
    for t in tensors:
        unique.setdefault(t.view_key, t)
    small = sorted((t for t in unique.values() if _batchable(t)), key=lambda t: (t.storage.path, t.data_offset))
    small_keys = {t.view_key for t in small}
    todo = sorted((t for t in unique.values() if t.view_key not in small_keys), key=lambda t: t.nbytes, reverse=True)
    batches: list[list[TensorInfo]] = []
    filled = 0
    for t in small:
        if not batches or batches[-1][-1].storage.path != t.storage.path or filled + t.numel > BATCH_ELEMENTS:
            batches.append([])
            filled = 0
        batches[-1].append(t)
        filled += t.numel
    total = sum(t.nbytes for t in unique.values())
    done = 0
    lock = threading.Lock()
    local = threading.local()
    maps = _MappedFiles()
    results: dict[tuple[object, ...], TensorStats] = {}

    def work(info: TensorInfo) -> None:
        nonlocal done
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        if device is not None:
            stats = tensor_stats_on_device(device, maps.get(info.storage.path), info)
        else:
            if not hasattr(local, "bufs"):
                local.bufs = _Buffers()
            stats = tensor_stats(maps.get(info.storage.path), info, local.bufs)
        with lock:
            results[info.view_key] = stats
            done += info.nbytes
            if progress is not None:
                progress(done, total)

    def work_batch(batch: list[TensorInfo]) -> None:
        nonlocal done
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        mm = maps.get(batch[0].storage.path)
        assert mm is not None
        stats = batch_stats(mm, batch, device)
        with lock:
            for info, st in zip(batch, stats, strict=True):
                results[info.view_key] = st
            done += sum(t.nbytes for t in batch)
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
                for batch in batches:
                    work_batch(batch)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    futures = [pool.submit(work, info) for info in todo]
                    futures += [pool.submit(work_batch, batch) for batch in batches]
                    for future in futures:
                        future.result()
    finally:
        torch.set_num_threads(previous_threads)
        maps.close()
    return {t.name: results[t.view_key] for t in tensors}
