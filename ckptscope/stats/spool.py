"""Statistics of tensors whose bytes are not (all) local files: byte ranges read through a
``RangeReader`` (an object store such as S3, or a shared path).

A listing is cut into ``RangeTask``s: whole tensors, grouped per file in offset order, with the
byte ranges they read (each once; neighbours merged where the gap between them is small).
``task_stats`` computes one task: ranges the reader can name as a local file are mapped directly;
the others are streamed once into one temporary file (in ``scratch_dir``, deleted afterwards, also
on error), the tensors are rebased onto it (their storage and pieces point into the copy) and the
ordinary engine (``engine.compute_stats``) computes them. The results are therefore those of the
local engine on the original file, exactly: same walker, same chunks, same definitions. Memory
stays bounded as for local files (the copy is mmapped and its pages released as the walk goes);
disk use is the task's bytes.

``compute_stats_ranged`` runs the tasks on local threads; ``ckptscope.jobs.dask_stats`` runs the
same tasks on Dask distributed.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from ckptscope.errors import Invalid, SourceChanged
from ckptscope.formats.model import Piece, StorageRef, TensorInfo, byte_parts

from .engine import Engine, Progress, StatsCancelled, choose_engine, compute_stats, single_threaded
from .model import TensorStats

MAX_TASK_BYTES = 256 << 20
MERGE_GAP = 64 << 10  # neighbouring ranges closer than this are read as one (zip headers, GGUF padding)
ALIGN = 4096  # a range keeps its offset modulo this in the copy: same alignment, same page boundaries
COPY_BUFFER = 1 << 20

Span = tuple[str, int, int]  # (path, start, end): a byte range of one file


class RangeReader(Protocol):
    """Where tensor bytes come from. ``path`` is ``TensorInfo.storage.path``: a local path or a URL
    such as "s3://bucket/key". Must be picklable (Dask ships it to its workers)."""

    def local_path(self, path: str) -> str | None:
        """A local file to mmap directly, or None: copy its ranges."""
        ...

    def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
        """Stream the bytes [start, end) of ``path`` into ``out``; returns the bytes written."""
        ...


class LocalFileReader:
    """A ``RangeReader`` over local (or shared, mounted) files: they are mapped where they lie."""

    def local_path(self, path: str) -> str | None:
        return path

    def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
        with open(path, "rb") as fh:
            fh.seek(start)
            done = 0
            while done < end - start:
                data = fh.read(min(COPY_BUFFER, end - start - done))
                if not data:
                    break
                out.write(data)
                done += len(data)
            return done


@dataclass(frozen=True, slots=True)
class RangeTask:
    tensors: tuple[TensorInfo, ...]  # whole tensors (a tensor is never split over tasks)
    ranges: tuple[Span, ...]  # (path, start, end) byte ranges this task reads, each once
    nbytes: int  # bytes the ranges hold (what the task reads, and its disk use when copied)

    @property
    def tensor_bytes(self) -> int:
        """The tensors' data bytes (the units of progress, as ``compute_stats`` counts them)."""
        return sum(t.nbytes for t in self.tensors)


# --- which bytes a tensor reads ------------------------------------------------------------------


def tensor_spans(info: TensorInfo) -> list[Span]:
    """The byte ranges the stats of ``info`` read: its view's extent (a strided view reads from its
    first to its last element), its pieces', its quantization parameters'."""
    if info.pieces:
        return [span for piece in info.pieces for span in tensor_spans(piece.info)]
    if info.encoding is not None:
        storage = info.storage
        return [(storage.path, storage.offset, storage.offset + storage.nbytes)] if storage.nbytes else []
    spans: list[Span] = []
    if info.numel:
        lo, hi = _extent(info)
        spans.append((info.storage.path, info.data_offset + lo * info.itemsize, info.data_offset + hi * info.itemsize))
    if info.quant is not None:
        for part in (info.quant.scales, info.quant.zero_points):
            if part is not None:
                spans += tensor_spans(part)
    return spans


def _extent(info: TensorInfo) -> tuple[int, int]:
    """The view's elements lie in [data + lo, data + hi) elements of its storage."""
    lo = sum(min(0, (size - 1) * stride) for size, stride in zip(info.shape, info.stride, strict=True))
    hi = sum(max(0, (size - 1) * stride) for size, stride in zip(info.shape, info.stride, strict=True))
    return lo, hi + 1


def _merged(spans: Sequence[Span], gap: int = 0, starts: dict[str, list[int]] | None = None) -> list[Span]:
    """Spans of one or more files, sorted, merged where they overlap or lie within ``gap`` of each
    other with no span of ``starts`` (every span's start, per file) between them."""
    out: list[Span] = []
    for path, start, end in sorted(spans):
        if out and out[-1][0] == path and start <= out[-1][2] + gap:
            prev_end = out[-1][2]
            others = starts.get(path, []) if starts is not None else []
            if start <= prev_end or bisect.bisect_left(others, prev_end) == bisect.bisect_left(others, start):
                out[-1] = (path, out[-1][1], max(prev_end, end))
                continue
        out.append((path, start, end))
    return out


# --- planning ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cluster:
    """Tensors whose bytes overlap (a tensor and a transposed or sliced view of its storage): they
    always go to the same task, so no byte is read by two tasks."""

    tensors: list[TensorInfo]
    spans: list[Span]
    pieced: bool

    @property
    def path(self) -> str:
        return self.spans[0][0] if self.spans else self.tensors[0].storage.path

    @property
    def start(self) -> int:
        return min((s for _, s, _ in self.spans), default=self.tensors[0].data_offset)

    @property
    def nbytes(self) -> int:
        return sum(end - start for _, start, end in _merged(self.spans))


def _clusters(unique: Sequence[TensorInfo]) -> list[_Cluster]:
    """The tensors grouped so that no two groups read the same byte (a tensor and a transposed or
    sliced view of its storage go together): union-find over overlapping spans."""
    parent = list(range(len(unique)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    spans_of = [tensor_spans(t) for t in unique]
    flat = sorted((path, start, end, i) for i, spans in enumerate(spans_of) for path, start, end in spans)
    reach: tuple[str, int, int] | None = None  # (path, end, owner) of the sweep so far
    for path, start, end, i in flat:
        if reach is not None and reach[0] == path and start < reach[1]:
            parent[root(i)] = root(reach[2])
            reach = (path, max(reach[1], end), reach[2])
        else:
            reach = (path, end, i)
    groups: dict[int, _Cluster] = {}
    for i, t in enumerate(unique):
        cluster = groups.setdefault(root(i), _Cluster([], [], False))
        cluster.tensors.append(t)
        cluster.spans += spans_of[i]
        cluster.pieced = cluster.pieced or bool(t.pieces)
    return list(groups.values())


def plan_range_tasks(
    tensors: Sequence[TensorInfo], *, max_task_bytes: int = MAX_TASK_BYTES, merge_gap: int = MERGE_GAP
) -> list[RangeTask]:
    """The tasks that compute the stats of ``tensors``, ordered by (file, offset). Tensors viewing
    the same data are computed once (``view_key``); the others are grouped per file in offset
    order, neighbouring ranges merged into one when less than ``merge_gap`` apart, a group closed
    before it passes ``max_task_bytes`` (a bigger tensor is a task of its own). A stitched tensor
    (torch.distributed.checkpoint chunks) is one task with one range per piece."""
    if max_task_bytes <= 0:
        raise Invalid(f"max_task_bytes must be positive, not {max_task_bytes}")
    unique: dict[tuple[object, ...], TensorInfo] = {}
    for t in tensors:
        unique.setdefault(t.view_key, t)
    clusters = sorted(_clusters(list(unique.values())), key=lambda c: (c.path, c.start))
    groups: list[tuple[list[_Cluster], int]] = []  # the clusters of each task, and its merge gap
    group_bytes = 0
    for cluster in clusters:
        if cluster.pieced:  # its pieces lie in several files: a task of its own
            groups.append(([cluster], 0))
            group_bytes = max_task_bytes + 1  # nothing joins it
            continue
        size = cluster.nbytes
        last = groups[-1][0] if groups else []
        if not last or last[-1].pieced or last[-1].path != cluster.path or group_bytes + size > max_task_bytes:
            groups.append(([], merge_gap))
            group_bytes = 0
        groups[-1][0].append(cluster)
        group_bytes += size
    starts: dict[str, list[int]] = {}
    for cluster in clusters:
        for path, start, _ in cluster.spans:
            starts.setdefault(path, []).append(start)
    for values in starts.values():
        values.sort()
    return [
        _task([t for c in group for t in c.tensors], [s for c in group for s in c.spans], gap, starts)
        for group, gap in groups
    ]


def _task(tensors: Sequence[TensorInfo], spans: Sequence[Span], gap: int, starts: dict[str, list[int]]) -> RangeTask:
    ordered = sorted(tensors, key=lambda t: (t.storage.path, t.data_offset, t.name))
    ranges = _merged(spans, gap, starts)
    return RangeTask(tuple(ordered), tuple(ranges), sum(end - start for _, start, end in ranges))


# --- one task ------------------------------------------------------------------------------------


class _Layout:
    """Where the task's bytes lie for the engine: a local file as it is, or a copied range's place
    in the spool file."""

    def __init__(self, local: dict[str, str], spool: str | None) -> None:
        self.local = local  # source path -> local path
        self.spool = spool
        self._placed: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}  # path -> starts, (end, pos)

    def place(self, path: str, start: int, end: int, pos: int) -> None:
        starts, rest = self._placed.setdefault(path, ([], []))
        at = bisect.bisect(starts, start)
        starts.insert(at, start)
        rest.insert(at, (end, pos))

    def where(self, path: str, start: int, end: int) -> int:
        """The spool offset of the source bytes [start, end) of ``path``."""
        starts, rest = self._placed.get(path, ([], []))
        at = bisect.bisect(starts, start) - 1
        if at < 0 or end > rest[at][0]:
            raise Invalid(f"bytes {start}-{end} of {path!r} lie outside the task's ranges")
        return rest[at][1] + start - starts[at]

    def path_for(self, path: str) -> str:
        local = self.local.get(path)
        if local is not None:
            return local
        assert self.spool is not None
        return self.spool

    def rebased(self, info: TensorInfo, tag: str) -> TensorInfo:
        """``info`` pointing into the local files and the spool (same values, same view)."""
        storage = info.storage
        if storage.path in self.local:
            moved = info._replace(storage=storage._replace(path=self.local[storage.path]))
        elif info.pieces or info.numel == 0 or (info.encoding is not None and storage.nbytes == 0):
            moved = info._replace(storage=StorageRef(self.path_for(storage.path), 0, 0, f"{storage.key}#{tag}"))
        elif info.encoding is not None:
            pos = self.where(storage.path, storage.offset, storage.offset + storage.nbytes)
            moved = info._replace(
                storage=StorageRef(self.path_for(storage.path), pos, storage.nbytes, f"{storage.key}#{tag}")
            )
        else:  # a strided view: its storage becomes exactly the view's extent in the spool
            lo, hi = _extent(info)
            start = info.data_offset + lo * info.itemsize
            nbytes = (hi - lo) * info.itemsize
            pos = self.where(storage.path, start, start + nbytes)
            moved = info._replace(
                storage=StorageRef(self.path_for(storage.path), pos, nbytes, f"{storage.key}#{tag}"), storage_offset=-lo
            )
        if info.pieces:
            moved = moved._replace(
                pieces=tuple(Piece(p.offsets, self.rebased(p.info, f"{tag}.{i}")) for i, p in enumerate(info.pieces))
            )
        if info.quant is not None:
            quant = info.quant
            moved = moved._replace(
                quant=quant._replace(
                    scales=None if quant.scales is None else self.rebased(quant.scales, f"{tag}.scales"),
                    zero_points=None if quant.zero_points is None else self.rebased(quant.zero_points, f"{tag}.zp"),
                )
            )
        return moved


def _spool_ranges(
    task: RangeTask,
    reader: RangeReader,
    layout: _Layout,
    out: BinaryIO,
    cancelled: Callable[[], bool] | None,
) -> None:
    """Each range of a file without a local path, streamed once into ``out`` at an offset that
    keeps its alignment."""
    cursor = 0
    for path, start, end in task.ranges:
        if path in layout.local:
            continue
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        pos = cursor + (start - cursor) % ALIGN
        out.seek(pos)
        target = out if cancelled is None else cast(BinaryIO, _CancellableWriter(out, cancelled))
        written = reader.copy_range(path, start, end, target)
        if written != end - start:
            raise SourceChanged(
                f"{path}: read {written} bytes at offset {start} where the listing has {end - start}; "
                "the object changed since it was listed"
            )
        layout.place(path, start, end, pos)
        cursor = pos + written
    out.flush()
    if os.fstat(out.fileno()).st_size < cursor:
        raise SourceChanged(f"the copy of {task.ranges[-1][0]} is shorter than its ranges")


class _CancellableWriter:
    """The spool file as a reader sees it: each write first checks for cancellation (a big range
    arrives in many writes)."""

    def __init__(self, out: BinaryIO, cancelled: Callable[[], bool]) -> None:
        self._out = out
        self._cancelled = cancelled

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._cancelled():
            raise StatsCancelled()
        return self._out.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._out, name)


@contextmanager
def _spool_file(scratch_dir: str | None) -> Iterator[tuple[str, BinaryIO]]:
    fd, path = tempfile.mkstemp(prefix="ckptscope-ranges-", suffix=".bin", dir=scratch_dir)
    try:
        with os.fdopen(fd, "w+b") as out:
            yield path, out
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def task_stats(
    task: RangeTask,
    reader: RangeReader,
    *,
    engine: Engine | None = None,
    scratch_dir: str | None = None,
    workers: int = 1,
    cancelled: Callable[[], bool] | None = None,
    progress: Progress | None = None,
) -> dict[str, TensorStats]:
    """The stats of the task's tensors, keyed by name: computed on the files the reader names as
    local, and on one spool file holding the other ranges (deleted afterwards, also on error).
    ``cancelled()`` is checked between ranges, writes and tensors (raising ``StatsCancelled``);
    ``progress(done, total)`` reports the task's tensor bytes as they are computed."""
    paths = {p.storage.path for t in task.tensors for p in byte_parts(t)} | {path for path, _, _ in task.ranges}
    local = {path: lp for path in paths if (lp := reader.local_path(path)) is not None}
    if len(local) == len(paths):
        layout = _Layout(local, None)
        return _computed(task, layout, engine, workers, cancelled, progress)
    with _spool_file(scratch_dir) as (spool, out):
        layout = _Layout(local, spool)
        _spool_ranges(task, reader, layout, out, cancelled)
        out.close()
        return _computed(task, layout, engine, workers, cancelled, progress)


def _computed(
    task: RangeTask,
    layout: _Layout,
    engine: Engine | None,
    workers: int,
    cancelled: Callable[[], bool] | None,
    progress: Progress | None,
) -> dict[str, TensorStats]:
    moved = [layout.rebased(t, str(i)) for i, t in enumerate(task.tensors)]
    stats = compute_stats(moved, workers=workers, engine=engine, cancelled=cancelled, progress=progress)
    return {t.name: stats[t.name] for t in task.tensors}


# --- all tasks on local threads ------------------------------------------------------------------


def compute_stats_ranged(
    tensors: Sequence[TensorInfo],
    reader: RangeReader,
    *,
    workers: int = 2,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    engine: Engine | None = None,
    scratch_dir: str | None = None,
    max_task_bytes: int = MAX_TASK_BYTES,
) -> dict[str, TensorStats]:
    """Stats for every tensor, keyed by name, like ``compute_stats`` (aliases get their view's
    stats), with the bytes read through ``reader``: the tasks of ``plan_range_tasks`` on
    ``workers`` threads; ``progress(done_bytes, total_bytes)`` as tensors finish (the units are
    ``compute_stats``'s: the distinct views' bytes); ``cancelled()`` checked between tasks (and
    between ranges, writes and tensors), raising ``StatsCancelled``."""
    engine = engine or choose_engine()
    tasks = plan_range_tasks(tensors, max_task_bytes=max_task_bytes)
    total = sum(task.tensor_bytes for task in tasks)
    lock = threading.Lock()
    failed = threading.Event()
    results: dict[tuple[object, ...], TensorStats] = {}
    partial: dict[int, int] = {}  # task -> its bytes computed so far

    def stop() -> bool:
        return failed.is_set() or (cancelled is not None and cancelled())

    def report(i: int, done: int) -> None:
        with lock:
            partial[i] = done
            if progress is not None:
                progress(sum(partial.values()), total)

    def run(i: int, task: RangeTask) -> None:
        if stop():
            raise StatsCancelled()
        stats = task_stats(
            task, reader, engine=engine, scratch_dir=scratch_dir, cancelled=stop, progress=lambda d, _: report(i, d)
        )
        with lock:
            for t in task.tensors:
                results[t.view_key] = stats[t.name]

    with single_threaded(engine):
        if workers <= 1:
            for i, task in enumerate(tasks):
                run(i, task)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptscope-ranges") as pool:
                futures = [pool.submit(run, i, task) for i, task in enumerate(tasks)]
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                if any(f.exception() is not None for f in finished):
                    failed.set()  # the running tasks stop at their next tensor, the queued ones at once
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
                    raise next((e for e in errors if not isinstance(e, StatsCancelled)), errors[0])
    return {t.name: results[t.view_key] for t in tensors}
