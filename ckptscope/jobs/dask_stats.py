"""Stats of a checkpoint fanned out to Dask distributed (``CKPTSCOPE_DASK_SCHEDULER``).

The listing is cut into the byte-range tasks of ``ckptscope.stats.spool.plan_range_tasks``: whole
tensors grouped per file in offset order, at most ``max_task_bytes`` of ranges each. Each task is
one Dask task running ``spool.task_stats`` on a worker, which reads its ranges itself through the
``RangeReader`` (from the object store, or mapping a shared path) and computes every tensor of the
task with the ordinary engine. Tasks are submitted in (file, offset) order, with priorities that
keep that order: the cheap form of "work near its shard" (neighbouring ranges of one object).

Merging is exact because nothing is merged: a tensor is never split over tasks, and every tensor
is computed whole by the same engine code as a local job (same walker, chunks and two-pass
definitions), so moments, histograms, the percentiles of issue 12 and digests are bit for bit those
of ``compute_stats``; the client only collects each task's per-tensor results. For the same reason
a task that is retried (an error, or a worker that died mid-task and was rescheduled by Dask) can
leave neither a partial nor a doubled result: its results arrive once, whole, or not at all.

Progress comes from the futures as they complete; ``cancelled()`` is polled meanwhile and cancels
what has not run yet (a task already running on a worker finishes and its result is dropped).

``scheduler`` is "tcp://host:port" (or "tls://…") for an existing cluster, or "local:N" for an
in-process ``LocalCluster`` of N worker processes with one thread each, made once per process and
reused (``close_local_clusters`` closes them at shutdown). ``distributed`` is an optional
dependency (the "dask" extra), imported only here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ckptscope.errors import CkptscopeError, Invalid, SourceUnreachable
from ckptscope.formats.model import TensorInfo
from ckptscope.stats.engine import Progress, StatsCancelled
from ckptscope.stats.model import TensorStats
from ckptscope.stats.spool import MAX_TASK_BYTES, RangeReader, RangeTask, plan_range_tasks, task_stats

log = logging.getLogger("ckptscope.jobs")

POLL_S = 0.25  # how often cancellation is checked while tasks run
CONNECT_TIMEOUT_S = 10
MISSING_EXTRA = "CKPTSCOPE_DASK_SCHEDULER needs the dask extra: pip install 'ckptscope[dask]'"

_clusters: dict[int, Any] = {}  # N -> the LocalCluster of "local:N"
_clusters_lock = threading.Lock()


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise Invalid(MISSING_EXTRA) from exc
    return distributed


def parse_scheduler(scheduler: str) -> tuple[str, int | str]:
    """("local", N) for "local:N", ("remote", address) for "tcp://…" or "tls://…"."""
    text = scheduler.strip()
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if not count.isdigit() or not 1 <= int(count) <= 256:
            raise Invalid(f"the Dask scheduler {scheduler!r}: local:N needs a worker count N from 1 to 256")
        return "local", int(count)
    if text.startswith(("tcp://", "tls://")) and len(text) > len("tcp://"):
        return "remote", text
    raise Invalid(f"the Dask scheduler {scheduler!r} is neither tcp://host:port (or tls://) nor local:N")


def _local_cluster(workers: int) -> Any:
    distributed = _distributed()
    with _clusters_lock:
        cluster = _clusters.get(workers)
        if cluster is None:
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            _clusters[workers] = cluster
            log.info("started a local Dask cluster: %d worker processes at %s", workers, cluster.scheduler_address)
        return cluster


def close_local_clusters() -> None:
    """Close the in-process clusters of "local:N" schedulers (for the server's shutdown)."""
    with _clusters_lock:
        clusters = list(_clusters.values())
        _clusters.clear()
    for cluster in clusters:
        try:
            cluster.close()
        except Exception:  # shutting down anyway
            log.exception("closing a local Dask cluster failed")


def connect(scheduler: str) -> Any:
    """A client of the scheduler (a new one each call; the local clusters are reused)."""
    distributed = _distributed()
    kind, where = parse_scheduler(scheduler)
    try:
        if kind == "local":
            assert isinstance(where, int)
            return distributed.Client(_local_cluster(where), set_as_default=False)
        return distributed.Client(where, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise SourceUnreachable(f"cannot reach the Dask scheduler {scheduler}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def compute_stats_dask(
    tensors: Sequence[TensorInfo],
    reader: RangeReader,
    scheduler: str,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    retries: int = 3,
    max_task_bytes: int = MAX_TASK_BYTES,
    scratch_dir: str | None = None,
) -> dict[str, TensorStats]:
    """Stats for every tensor, keyed by name (aliases get their view's stats), computed on the Dask
    cluster ``scheduler``: equal to ``compute_stats`` on the same bytes. ``progress(done_bytes,
    total_bytes)`` as tasks finish; ``cancelled()`` is polled every ``POLL_S`` and cancels the
    remaining tasks (raising ``StatsCancelled``). ``scratch_dir``: where workers spool copied
    ranges (their temp directory when None)."""
    _distributed()  # the extra is installed (else the error says how to install it)
    tasks = plan_range_tasks(tensors, max_task_bytes=max_task_bytes)
    if not tasks:
        return {}
    total = sum(task.tensor_bytes for task in tasks)
    results: dict[tuple[object, ...], TensorStats] = {}
    client = connect(scheduler)
    futures: dict[Any, RangeTask] = {}
    try:
        batch = uuid.uuid4().hex[:12]
        futures = {
            client.submit(
                task_stats,
                task,
                reader,
                scratch_dir=scratch_dir,
                key=f"ckptscope-stats-{batch}-{i}",
                pure=False,
                retries=retries,
                priority=len(tasks) - i,  # in (file, offset) order
            ): task
            for i, task in enumerate(tasks)
        }
        finished: queue.SimpleQueue[Any] = queue.SimpleQueue()  # futures as they complete
        for future in futures:
            future.add_done_callback(finished.put)
        done = 0
        for _ in range(len(futures)):
            while True:
                if cancelled is not None and cancelled():
                    raise StatsCancelled()  # the remaining futures are cancelled below
                try:
                    future = finished.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    continue
            task = futures[future]
            _collect(future, task, results, scheduler)
            done += task.tensor_bytes
            if progress is not None:
                progress(done, total)
    except BaseException:  # cancelled, a task failed, or interrupted: nothing left running for us
        try:
            client.cancel([f for f in futures if not f.done()], force=True)
        except Exception:  # the scheduler is gone: nothing runs for us there anyway
            log.debug("cancelling the remaining Dask tasks failed", exc_info=True)
        raise
    finally:
        client.close()
    return {t.name: results[t.view_key] for t in tensors}


def _collect(future: Any, task: RangeTask, results: dict[tuple[object, ...], TensorStats], scheduler: str) -> None:
    try:
        stats = future.result()
    except CkptscopeError:
        raise  # the source's own error (changed, denied, ...) as it is
    except (Exception, asyncio.CancelledError) as exc:  # distributed's cancellations are BaseExceptions
        names = ", ".join(repr(t.name) for t in task.tensors[:3]) + (", ..." if len(task.tensors) > 3 else "")
        raise CkptscopeError(
            f"a stats task ({names}) failed on the Dask cluster {scheduler}: {type(exc).__name__}: {_one_line(exc)}",
            code="dask_task_failed",
        ) from exc
    for t in task.tensors:
        results[t.view_key] = stats[t.name]
