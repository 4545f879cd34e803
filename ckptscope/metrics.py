"""Prometheus metrics (``prometheus-client``), declared once here.

Two modes:

- In process (the default, e.g. an app under a test client): each ``Metrics`` has its own registry,
  so two apps in one process never share counts.
- Shared through a directory (``share_across_processes(<data dir>/metrics)``, which the server's
  app factory calls before any metric exists): prometheus-client's multiprocess mode. Every
  server process that uses the same data directory writes its values to memory-mapped files there,
  and any process's ``/metrics`` reports the sum over all of them (the queue depth over the live
  ones only). A process takes the lowest free *slot* (an ``flock``-held ``slot-N.lock``) as its
  file identity, so the files stay few however often servers restart (a restarted server continues
  its slot's counters; totals never go backwards), and processes in different containers that share
  the volume never collide on a PID. A slot whose lock is free belongs to a dead process: its live
  gauges are removed (``mark_process_dead``) at start and at each scrape.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNMATCHED_ROUTE = "unmatched"  # the one route label of every path that no route serves
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def mark_process_dead(identifier: str, directory: Path) -> None:
    """Remove the live gauges (the queue depth) of the process that wrote under ``identifier``."""
    _mark_process_dead(identifier, str(directory))  # type: ignore[no-untyped-call]


class _SharedDirectory:
    """This process's slot in a multiprocess metrics directory (held for the process's life)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._pid = os.getpid()
        self.slot, self._lock_fd = self._take_slot()
        mark_process_dead(self.slot, directory)  # live gauges of the slot's previous (dead) holder
        self.clean_dead()

    def _lock_path(self, slot: str) -> Path:
        return self.directory / f"slot-{slot}.lock"

    def _take_slot(self) -> tuple[str, int]:
        n = 0
        while True:
            fd = os.open(self._lock_path(str(n)), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                n += 1
                continue
            return str(n), fd

    def clean_dead(self) -> None:
        """Remove the live gauges of slots no process holds (their process died)."""
        for path in self.directory.glob("slot-*.lock"):
            slot = path.name[len("slot-") : -len(".lock")]
            if slot == self.slot:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # held: alive
            else:
                mark_process_dead(slot, self.directory)
            finally:
                os.close(fd)  # closing releases the lock

    def identifier(self) -> str:
        # a forked child (should one ever write a metric) gets files of its own, never its parent's
        return self.slot if os.getpid() == self._pid else f"{self.slot}x{os.getpid()}"


_shared: _SharedDirectory | None = None


def share_across_processes(directory: Path) -> None:
    """Switch this process to multiprocess metrics in ``directory``. Call it before any metric is
    created (the first ``Metrics()``); once per process (again with the same directory: no-op)."""
    global _shared
    if _shared is not None:
        if _shared.directory != directory:
            raise RuntimeError(f"metrics are already shared through {_shared.directory}")
        return
    shared = _SharedDirectory(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # where prometheus-client puts the files
    values.ValueClass = values.MultiProcessValue(shared.identifier)  # type: ignore[no-untyped-call]
    _shared = shared


class Metrics:
    """The service's metrics. Record through the attributes (prometheus-client objects) or, by
    name, through ``inc`` / ``observe``; ``render`` gives the Prometheus text format."""

    def __init__(self) -> None:
        self._shared = _shared
        # shared: values live in the directory's files and a collector reads them all back
        own = None if self._shared is not None else CollectorRegistry()
        self.requests = Counter(
            "ckptscope_http_requests_total",
            "HTTP requests by method and status class",
            ["method", "status"],
            registry=own,
        )
        self.request_seconds = Histogram(
            "ckptscope_http_request_duration_seconds",
            "HTTP request latency by route template, method and status class",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=own,
        )
        self.errors = Counter("ckptscope_http_errors_total", "HTTP responses with a 5xx status", registry=own)
        self.uploads = Counter("ckptscope_uploads_total", "checkpoints accepted", registry=own)
        self.upload_bytes = Counter("ckptscope_upload_bytes_total", "bytes of accepted checkpoints", registry=own)
        self.references = Counter(
            "ckptscope_references_total", "checkpoints registered where they live (file:// or s3://)", registry=own
        )
        self.uploads_rejected = Counter(
            "ckptscope_uploads_rejected_total", "uploads refused, by reason", ["reason"], registry=own
        )
        self.parse_failures = Counter(
            "ckptscope_parse_failures_total",
            "checkpoints that failed to parse (uploads and registrations), by error code",
            ["code"],
            registry=own,
        )
        self.jobs = Counter(
            "ckptscope_jobs_total", "background jobs finished, by kind and state", ["kind", "state"], registry=own
        )
        self.job_seconds = Histogram(
            "ckptscope_job_duration_seconds", "duration of finished stats jobs", buckets=JOB_BUCKETS, registry=own
        )
        self.stats_bytes = Counter("ckptscope_stats_bytes_total", "tensor bytes of finished stats jobs", registry=own)
        self.stats_seconds = Counter(
            "ckptscope_stats_seconds_total",
            "seconds spent computing finished stats jobs (throughput: rate of bytes / rate of seconds)",
            registry=own,
        )
        self.queue_depth = Gauge(
            "ckptscope_stats_queue_depth",
            "stats jobs queued or running, not yet finished (summed over live processes)",
            multiprocess_mode="livesum",
            registry=own,
        )
        self._registry = own
        self._by_name: dict[str, Any] = {
            "ckptscope_http_requests_total": self.requests,
            "ckptscope_http_request_duration_seconds": self.request_seconds,
            "ckptscope_http_errors_total": self.errors,
            "ckptscope_uploads_total": self.uploads,
            "ckptscope_upload_bytes_total": self.upload_bytes,
            "ckptscope_references_total": self.references,
            "ckptscope_uploads_rejected_total": self.uploads_rejected,
            "ckptscope_parse_failures_total": self.parse_failures,
            "ckptscope_jobs_total": self.jobs,
            "ckptscope_job_duration_seconds": self.job_seconds,
            "ckptscope_stats_bytes_total": self.stats_bytes,
            "ckptscope_stats_seconds_total": self.stats_seconds,
        }

    def _metric(self, name: str, labels: dict[str, str]) -> Any:
        metric = self._by_name[name]  # an unknown name is a bug: KeyError
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._metric(name, labels).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, labels).observe(value)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished HTTP request: ``route`` is the matched route's path template."""
        status_class = f"{status // 100}xx"
        self.requests.labels(method=method, status=status_class).inc()
        self.request_seconds.labels(route=route, method=method, status=status_class).observe(seconds)
        if status >= 500:
            self.errors.inc()

    def stats_finished(self, nbytes: int, seconds: float) -> None:
        self.jobs.labels(kind="stats", state="done").inc()
        self.job_seconds.observe(seconds)
        self.stats_bytes.inc(nbytes)
        self.stats_seconds.inc(seconds)

    def job_queued(self) -> None:
        self.queue_depth.inc()

    def job_left_queue(self) -> None:
        """A queued job finished, failed, or was dropped without running."""
        self.queue_depth.dec()

    def render(self) -> bytes:
        if self._shared is None:
            assert self._registry is not None
            return generate_latest(self._registry)
        self._shared.clean_dead()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(self._shared.directory))  # type: ignore[no-untyped-call]
        return generate_latest(registry)
