"""Runs stats jobs on a background thread and records their progress in the catalogue."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from app.store.catalogue import Content, Job, TensorRow, utcnow

if TYPE_CHECKING:
    from app.services.core import Core

log = logging.getLogger("ckptscope.jobs")
PROGRESS_INTERVAL_S = 0.25


class JobRunner:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._active: dict[str, tuple[str, Future[None]]] = {}  # content key -> (job id, future)
        self._stopping = False

    def start(self) -> None:
        """Start the worker and queue stats for contents a previous run left unfinished."""
        with self.core.catalogue.session() as session:
            keys = list(session.scalars(select(Content.key).where(Content.stats_state.in_(("pending", "running")))))
        for key in keys:
            self.submit_stats(key)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptscope-job")
            return self._pool

    def submit_stats(self, content_key: str) -> str:
        with self._lock:
            active = self._active.get(content_key)
            if active is not None and not active[1].done():
                return active[0]
            self._cancelled.discard(content_key)
        with self.core.catalogue.session() as session, session.begin():
            job = Job(kind="stats", content_key=content_key, state="queued")
            session.add(job)
            content = session.get(Content, content_key)
            if content is not None:
                content.stats_state = "pending"
        future = self._executor().submit(self._run_stats, job.id, content_key)
        with self._lock:
            self._active[content_key] = (job.id, future)
        return job.id

    def job_for(self, content_key: str) -> str | None:
        """The newest stats job of a content, if any."""
        with self.core.catalogue.session() as session:
            return session.scalars(
                select(Job.id).where(Job.content_key == content_key).order_by(Job.created_at.desc()).limit(1)
            ).first()

    def cancel(self, content_key: str) -> None:
        with self._lock:
            self._cancelled.add(content_key)

    def shutdown(self) -> None:
        """Abandon running jobs cleanly: they stop at the next tensor and stay queued for the next start."""
        self._stopping = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _set_job(self, job_id: str, **values: object) -> None:
        with self.core.catalogue.engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(**values))

    def _set_content(self, key: str, **values: object) -> None:
        with self.core.catalogue.engine.begin() as conn:
            conn.execute(update(Content).where(Content.key == key).values(**values))

    def _run_stats(self, job_id: str, key: str) -> None:
        from app.services.checkpoints import row_to_info, save_stats
        from app.stats.engine import StatsCancelled, compute_stats

        try:
            with self.core.catalogue.session() as session:
                rows = session.scalars(select(TensorRow).where(TensorRow.content_key == key)).all()
                infos = [(r.position, row_to_info(self.core, r)) for r in rows]
            total = sum(info.nbytes for _, info in infos)
            self._set_job(job_id, state="running", total=total)
            self._set_content(key, stats_state="running", stats_error=None)
            last = 0.0

            def progress(done: int, total: int) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= PROGRESS_INTERVAL_S or done == total:
                    last = now
                    self._set_job(job_id, done=done)

            started = time.monotonic()
            stats = compute_stats(
                [info for _, info in infos],
                workers=self.core.settings.stats_workers,
                progress=progress,
                cancelled=lambda: self._stopping or key in self._cancelled,
            )
            updated = save_stats(self.core, key, {pos: stats[info.name] for pos, info in infos})
            if infos and not updated:  # the checkpoint was deleted while its stats ran
                raise StatsCancelled()
            self._set_content(key, stats_state="done")
            self._set_job(job_id, state="done", done=total, finished_at=utcnow())
            self.core.metrics.inc("ckptscope_jobs_total", kind="stats", state="done")
            self.core.metrics.observe("ckptscope_job_duration_seconds", time.monotonic() - started)
            log.info(
                "stats for %s: %d tensors, %d bytes in %.2fs", key[:12], len(infos), total, time.monotonic() - started
            )
        except StatsCancelled:
            state = "queued" if self._stopping else "cancelled"
            self._set_job(job_id, state=state, finished_at=None if self._stopping else utcnow())
            self.core.metrics.inc("ckptscope_jobs_total", kind="stats", state=state)
        except Exception as exc:  # a job must never die silently
            log.exception("stats job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"[:500]
            self._set_job(job_id, state="failed", error=message, finished_at=utcnow())
            self._set_content(key, stats_state="failed", stats_error=message)
            self.core.metrics.inc("ckptscope_jobs_total", kind="stats", state="failed")
