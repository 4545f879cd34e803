"""Runs stats jobs on a background thread and records their progress in the catalogue.

Several server processes may share one catalogue, so a content's stats are *claimed* before they
are computed: a conditional UPDATE sets ``stats_owner`` to this process and ``stats_heartbeat`` to
now, and only succeeds while nobody else holds a fresh claim. The owner renews the heartbeat as it
works; the same UPDATE tells it when the content was deleted (by any process) or taken over, and
the job then stops at the next tensor. A sweeper thread picks up work that a crashed or stopped
process left behind (pending or running with a stale heartbeat). On shutdown a running job stops at
the next tensor, the job ends "abandoned", and its content goes back to "pending" for whichever
process runs next (under a new job, which the checkpoint's ``job_id`` then names).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import and_, delete, or_, select, update

from ckptscope.formats.model import TensorInfo
from ckptscope.insights.init_verdict import verdict_for
from ckptscope.metrics import Metrics
from ckptscope.stats.devices import resolve_device
from ckptscope.stats.engine import Engine, StatsCancelled, choose_engine, compute_stats
from ckptscope.stats.model import TensorStats
from ckptscope.store.catalogue import Catalogue, Content, Job, JobState, StatsState, utcnow
from ckptscope.store.queries import CatalogueQueries
from ckptscope.store.source_reader import SourceRangeReader

log = logging.getLogger("ckptscope.jobs")
PROGRESS_INTERVAL_S = 0.25
# A claim not renewed for settings.job_stale_s (default 60 s) belongs to a process that is gone.
# A running job renews it (and checks it still holds it) every stale/8 s, at most every second;
# the sweeper looks for abandoned work every stale/3 s.


class JobRunner:
    """``device`` is the CKPTSCOPE_STATS_DEVICE setting ("" for the CPU engine)."""

    def __init__(
        self,
        catalogue: Catalogue,
        queries: CatalogueQueries,
        metrics: Metrics,
        *,
        workers: int,
        stale_s: float,
        device: str,
        reader_for: Callable[[str], SourceRangeReader] | None = None,
        verify: Callable[[str], None] | None = None,
        dask_scheduler: str = "",
        scratch_dir: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.queries = queries
        self.metrics = metrics
        self.workers = workers
        self.device_setting = device
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._active: dict[str, tuple[str, Future[None]]] = {}  # content key -> (job id, future)
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.device: str | None = None  # the torch device of the stats, None for the CPU engine
        self.engine: Engine | None = None  # chosen at start (it imports torch)
        self.stale_s = stale_s
        # referenced checkpoints (issue 17): where a content's bytes are read from, the check that
        # its source did not change while it was read, Dask, and where remote ranges are spooled
        self.reader_for = reader_for
        self.verify = verify
        self.dask_scheduler = dask_scheduler
        self.scratch_dir = scratch_dir
        self.heartbeat_s = min(1.0, self.stale_s / 8)

    def start(self) -> None:
        """Choose the stats engine (one log line says which), queue stats that earlier runs left
        unfinished, then keep sweeping for abandoned work."""
        self.device = resolve_device(self.device_setting)
        self.engine = choose_engine(self.device)
        log.info("stats engine: %s", self.engine.description)
        self.sweep()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ckptscope-sweeper", daemon=True)
        self._sweeper.start()

    def sweep(self) -> None:
        stale = utcnow() - timedelta(seconds=self.stale_s)
        with self.catalogue.session() as session:
            keys = list(
                session.scalars(
                    select(Content.key).where(
                        Content.stats_state.in_((StatsState.PENDING, StatsState.RUNNING)),
                        or_(Content.stats_heartbeat.is_(None), Content.stats_heartbeat < stale),
                    )
                )
            )
        for key in keys:
            if self._active_job(key) is not None:
                continue
            # the jobs that left this work unfinished (a stopped or crashed process) end here
            with self.catalogue.engine.begin() as conn:
                conn.execute(
                    update(Job)
                    .where(Job.content_key == key, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
                    .values(state=JobState.ABANDONED, finished_at=utcnow())
                )
            self.submit_stats(key)

    def _active_job(self, content_key: str) -> str | None:
        """The id of this process's queued or running job for the content, if any."""
        with self._lock:
            active = self._active.get(content_key)
            return active[0] if active is not None and not active[1].done() else None

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self.stale_s / 3):
            try:
                self.sweep()
            except Exception:  # the database may be briefly unreachable; try again next time
                log.exception("sweep for abandoned stats failed")

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptscope-job")
            return self._pool

    def submit_stats(self, content_key: str) -> str:
        active = self._active_job(content_key)
        if active is not None:
            return active
        with self._lock:
            self._cancelled.discard(content_key)
        with self.catalogue.session() as session, session.begin():
            job = Job(kind="stats", content_key=content_key, state=JobState.QUEUED)
            session.add(job)
            session.execute(
                update(Content)
                .where(Content.key == content_key, Content.stats_state.in_((StatsState.PENDING, StatsState.FAILED)))
                .values(stats_state=StatsState.PENDING, stats_heartbeat=utcnow())  # queued here, as of now
            )
        future = self._executor().submit(self._run_stats, job.id, content_key)
        self.metrics.job_queued()
        future.add_done_callback(lambda _: self.metrics.job_left_queue())  # ran, failed or dropped
        with self._lock:
            self._active[content_key] = (job.id, future)
        return job.id

    def cancel(self, content_key: str) -> None:
        with self._lock:
            self._cancelled.add(content_key)

    def shutdown(self) -> None:
        """Abandon jobs cleanly: a running one stops at the next tensor; it and the queued ones end
        "abandoned", and their checkpoints go back to pending for the next process to finish."""
        self._stopping.set()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            never_started = [job_id for job_id, future in self._active.values() if future.cancelled()]
        for job_id in never_started:
            self._set_job(job_id, state=JobState.ABANDONED, finished_at=utcnow())
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)

    # --- catalogue writes ---------------------------------------------------------------------

    def _set_job(self, job_id: str, **values: object) -> None:
        with self.catalogue.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(**values))

    def _set_own_content(self, key: str, **values: object) -> bool:
        """Update the content while this process holds its claim; False when it no longer does."""
        with self.catalogue.engine.begin() as conn:
            result = conn.execute(
                update(Content).where(Content.key == key, Content.stats_owner == self.owner).values(**values)
            )
            return result.rowcount == 1

    def _claim(self, key: str) -> bool:
        stale = utcnow() - timedelta(seconds=self.stale_s)
        claimable = or_(
            Content.stats_state.in_((StatsState.PENDING, StatsState.FAILED)),
            and_(
                Content.stats_state == StatsState.RUNNING,
                or_(Content.stats_heartbeat.is_(None), Content.stats_heartbeat < stale),
            ),
        )
        with self.catalogue.engine.begin() as conn:
            result = conn.execute(
                update(Content)
                .where(Content.key == key, claimable)
                .values(
                    stats_state=StatsState.RUNNING, stats_owner=self.owner, stats_heartbeat=utcnow(), stats_error=None
                )
            )
            return result.rowcount == 1

    # --- the job ------------------------------------------------------------------------------

    def _compute(
        self,
        key: str,
        tensors: list[TensorInfo],
        progress: Callable[[int, int], None],
        cancelled: Callable[[], bool],
    ) -> dict[str, TensorStats]:
        """The stats of a content's tensors: on Dask when a scheduler is set (for uploads only when
        it is a local:N cluster), else here (ranges of referenced objects spooled; local files and
        blobs mapped where they are)."""
        reader = self.reader_for(key) if self.reader_for is not None else None
        # Dask workers read the bytes where they live: a bucket, or a path they all see. An
        # upload's blobs are in this server's data directory, which only a local:N cluster shares.
        on_dask = bool(self.dask_scheduler) and (
            self.dask_scheduler.startswith("local:") or bool(reader and reader.referenced)
        )
        if on_dask and reader is not None:
            from .dask_stats import compute_stats_dask

            return compute_stats_dask(tensors, reader, self.dask_scheduler, progress=progress, cancelled=cancelled)
        if reader is not None and reader.remote:
            from ckptscope.stats.spool import compute_stats_ranged

            return compute_stats_ranged(
                tensors,
                reader,
                workers=self.workers,
                progress=progress,
                cancelled=cancelled,
                engine=self.engine,
                scratch_dir=self.scratch_dir,
            )
        return compute_stats(tensors, workers=self.workers, progress=progress, cancelled=cancelled, engine=self.engine)

    def _run_stats(self, job_id: str, key: str) -> None:
        try:
            if self._stopping.is_set():
                self._set_job(job_id, state=JobState.ABANDONED, finished_at=utcnow())  # the content stays pending
                return
            if not self._claim(key):
                # done meanwhile, deleted, or another process holds a fresh claim: its job is the one to show
                with self.catalogue.engine.begin() as conn:
                    conn.execute(delete(Job).where(Job.id == job_id))
                return
            infos = self.queries.stats_inputs(key)
            total = sum(info.nbytes for _, info in infos)
            self._set_job(job_id, state=JobState.RUNNING, total=total)
            last_progress = last_beat = time.monotonic()
            lost = False

            def progress(done: int, total: int) -> None:
                nonlocal last_progress
                now = time.monotonic()
                if now - last_progress >= PROGRESS_INTERVAL_S or done == total:
                    last_progress = now
                    self._set_job(job_id, done=done)

            def cancelled() -> bool:
                nonlocal last_beat, lost
                if self._stopping.is_set() or key in self._cancelled or lost:
                    return True
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_s:
                    last_beat = now
                    lost = not self._set_own_content(key, stats_heartbeat=utcnow())  # deleted or taken over
                return lost

            started = time.monotonic()
            try:
                stats = self._compute(key, [info for _, info in infos], progress, cancelled)
            except FileNotFoundError:
                if not self._set_own_content(key, stats_heartbeat=utcnow()):
                    raise StatsCancelled() from None  # deleted while its stats ran: its blob went with it
                raise
            if self.verify is not None:
                self.verify(key)  # a source that changed meanwhile: these stats are of no current bytes
            module_types = self.queries.module_types_of(key)
            judged = {  # each tensor's init verdict, once here, read by every page and API call after
                pos: replace(stats[info.name], init=verdict_for(info, stats[info.name], module_types).to_json())
                for pos, info in infos
            }
            updated = self.queries.save_stats(key, judged)
            if not self._set_own_content(key, stats_state=StatsState.DONE, stats_owner=None) or (infos and not updated):
                raise StatsCancelled()  # the checkpoint was deleted (or taken over) while its stats ran
            self._set_job(job_id, state=JobState.DONE, done=total, finished_at=utcnow())
            self.metrics.stats_finished(total, time.monotonic() - started)
            log.info(
                "stats for %s: %d tensors, %d bytes in %.2fs", key[:12], len(infos), total, time.monotonic() - started
            )
        except StatsCancelled:
            if self._stopping.is_set():  # shutting down: leave it for the next process to pick up
                self._set_own_content(key, stats_state=StatsState.PENDING, stats_owner=None, stats_heartbeat=None)
                self._set_job(job_id, state=JobState.ABANDONED, finished_at=utcnow())
                state = JobState.ABANDONED
            else:
                self._set_job(job_id, state=JobState.CANCELLED, finished_at=utcnow())
                state = JobState.CANCELLED
            self.metrics.inc("ckptscope_jobs_total", kind="stats", state=state)
            log.info("stats for %s %s", key[:12], state)
        except Exception as exc:  # a job must never die silently
            log.exception("stats job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"[:500]
            self._set_job(job_id, state=JobState.FAILED, error=message, finished_at=utcnow())
            self._set_own_content(key, stats_state=StatsState.FAILED, stats_error=message, stats_owner=None)
            self.metrics.inc("ckptscope_jobs_total", kind="stats", state=JobState.FAILED)
