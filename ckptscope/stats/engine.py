"""The stats engine: statistics of every tensor of a listing, on two worker threads.

Three per-tensor engines share one walker (``walk.py``) and one set of definitions: the C kernel
(``kernel_engine.py``, the default on the CPU), the torch-op engine (``torch_engine.py``) on a torch
device such as a CUDA GPU, and the same torch-op engine on the CPU as the fallback where the kernel
is not built. Small dense tensors are summarised in batches (``batch.py``). ``choose_engine`` says
which engine runs; the server logs it once at start.

The kernel engine never imports torch (the walker, the batches and the kernel read every dtype
themselves); torch is imported only where a torch-op engine is chosen.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from ckptscope.formats.model import TensorInfo

from .batch import BATCH_ELEMENTS, batch_stats, batchable
from .kernel_engine import load_kernel, tensor_stats_with_kernel
from .model import TensorStats
from .pieced import pieced_stats
from .prefetch import Prefetcher, ranges_of
from .walk import Buffers, MappedFiles

log = logging.getLogger("ckptscope.stats")

Progress = Callable[[int, int], None]
PerTensor = Callable[..., TensorStats]  # (mm, info, bufs, extras) -> stats


class StatsCancelled(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Engine:
    name: str  # "kernel", "torch-fallback" (the CPU without the kernel) or "torch" (on a device)
    description: str  # for the log line that says which engine runs
    per_tensor: PerTensor
    batch_device: str | None  # the torch device batches of small tensors are reduced on (None: numpy)


def choose_engine(device: str | None = None) -> Engine:
    """``device``: None for the CPU (the C kernel, or the torch-op fallback where it is not built),
    or a torch device (``"cuda"``, ``"cpu"``) for the torch-op engine there."""
    if device is not None:
        from .devices import describe
        from .torch_engine import tensor_stats_with_torch

        return Engine("torch", f"torch ops on {describe(device)}", partial(tensor_stats_with_torch, device), device)
    kernel, why = load_kernel()
    if kernel is None:
        from .torch_engine import tensor_stats_with_torch

        fallback = partial(tensor_stats_with_torch, "cpu")
        return Engine("torch-fallback", f"torch ops on the CPU (fallback: {why})", fallback, "cpu")
    return Engine("kernel", "the C kernel on the CPU", partial(tensor_stats_with_kernel, kernel), None)


@contextmanager
def single_threaded(engine: Engine) -> Iterator[None]:
    """Around work that runs engines on several threads at once: a torch-op engine gets one torch
    thread per caller and frombuffer's read-only warning silenced (process-wide settings, saved and
    restored). The kernel engine needs neither, and torch is not imported for it."""
    if engine.name == "kernel":
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer on a read-only mmap
            yield
    finally:
        torch.set_num_threads(previous)


def compute_stats(
    tensors: Sequence[TensorInfo],
    *,
    workers: int = 2,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    device: str | None = None,
    engine: Engine | None = None,
    extras: bool = True,
) -> dict[str, TensorStats]:
    """Stats for every tensor, keyed by name. Tensors viewing the same data are computed once.
    ``engine`` (or ``device``, see ``choose_engine``) says where they are computed. ``extras``:
    also issue 12's statistics (percentiles, log-magnitude histogram, digest); without them only
    the moments, counts and the 64-bin histogram are computed (for measuring the passes)."""
    engine = engine or choose_engine(device)
    unique: dict[tuple[object, ...], TensorInfo] = {}
    for t in tensors:
        unique.setdefault(t.view_key, t)
    small = sorted((t for t in unique.values() if batchable(t)), key=lambda t: (t.storage.path, t.data_offset))
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
    maps = MappedFiles()
    results: dict[tuple[object, ...], TensorStats] = {}

    def record(infos: Sequence[TensorInfo], stats: Sequence[TensorStats]) -> None:
        nonlocal done
        with lock:
            for info, st in zip(infos, stats, strict=True):
                results[info.view_key] = st
            done += sum(t.nbytes for t in infos)
            if progress is not None:
                progress(done, total)

    # the workers take the tensors in this order; the prefetcher reads ahead of them in it
    order: list[Sequence[TensorInfo]] = [[t] for t in todo]
    order += batches
    prefetcher = Prefetcher(ranges_of(order))

    def work(index: int, info: TensorInfo) -> None:
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        prefetcher.started(index)
        if not hasattr(local, "bufs"):
            local.bufs = Buffers()
        if info.pieces:  # stitched from chunks (torch.distributed.checkpoint): each piece in its file
            record([info], [pieced_stats(info, maps.get, local.bufs, engine.name, engine.batch_device, extras)])
            return
        record([info], [engine.per_tensor(maps.get(info.storage.path), info, local.bufs, extras)])

    def work_batch(index: int, batch: list[TensorInfo]) -> None:
        if cancelled is not None and cancelled():
            raise StatsCancelled()
        prefetcher.started(index)
        mm = maps.get(batch[0].storage.path)
        assert mm is not None  # batched tensors have bytes, so their file is not empty
        record(batch, batch_stats(mm, batch, engine.batch_device, extras))

    first_batch = len(todo)
    try:
        with single_threaded(engine), prefetcher:
            if workers <= 1:
                for i, info in enumerate(todo):
                    work(i, info)
                for i, batch in enumerate(batches, first_batch):
                    work_batch(i, batch)
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    futures = [pool.submit(work, i, info) for i, info in enumerate(todo)]
                    futures += [pool.submit(work_batch, i, batch) for i, batch in enumerate(batches, first_batch)]
                    for future in futures:
                        future.result()
    finally:
        maps.close()
    return {t.name: results[t.view_key] for t in tensors}
