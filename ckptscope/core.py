"""The composition root: the one object that builds and holds the service's parts (settings,
metrics, blob store, catalogue and its queries, tree cache, job runner) and wires them together.
Everything below it gets its collaborators passed in."""

from __future__ import annotations

import threading

from ckptscope.config import Settings
from ckptscope.jobs.runner import JobRunner
from ckptscope.metrics import Metrics
from ckptscope.stats.tree import TreeCache
from ckptscope.store.blobs import BlobStore
from ckptscope.store.catalogue import Catalogue
from ckptscope.store.queries import CatalogueQueries


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(settings.data_dir)
        self.blobs.clean_tmp()
        self.catalogue = Catalogue(settings.resolved_database_url)
        self.queries = CatalogueQueries(self.catalogue, self.blobs)
        self.trees = TreeCache()
        self.parse_limits = settings.parse_limits
        self.parse_slots = threading.BoundedSemaphore(settings.parallel_parses)  # a queue, not N at 100% CPU
        self.jobs = JobRunner(
            self.catalogue,
            self.queries,
            self.metrics,
            workers=settings.stats_workers,
            stale_s=settings.job_stale_s,
            device=settings.stats_device,
        )

    def start(self) -> None:
        self.jobs.start()

    def close(self) -> None:
        self.jobs.shutdown()
        self.catalogue.dispose()
