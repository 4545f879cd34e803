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
from ckptscope.store.source_reader import SourceRangeReader, content_objects, verify_unchanged
from ckptscope.store.sources import SourceClient, SourcePolicy


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
        # checkpoints opened where they live: which roots and buckets may be read, the one client
        # that reads them (AWS environment), and when each referenced checkpoint was last checked
        self.source_policy = SourcePolicy(settings.source_root_list, settings.source_bucket_list)
        self.sources = SourceClient()
        self.source_checks: dict[str, float] = {}
        self.jobs = JobRunner(
            self.catalogue,
            self.queries,
            self.metrics,
            workers=settings.stats_workers,
            stale_s=settings.job_stale_s,
            device=settings.stats_device,
            reader_for=self.range_reader,
            verify=lambda key: verify_unchanged(self.sources, self.queries, key),
            dask_scheduler=settings.dask_scheduler,
            scratch_dir=str(self.blobs.tmp_dir),
        )

    def range_reader(self, *content_keys: str) -> SourceRangeReader:
        """Where the contents' tensor bytes are read from (``store.source_reader``)."""
        return SourceRangeReader(self.sources, [o for key in content_keys for o in content_objects(self.queries, key)])

    def start(self) -> None:
        self.jobs.start()

    def close(self) -> None:
        self.jobs.shutdown()
        if self.settings.dask_scheduler.startswith("local:"):
            from ckptscope.jobs.dask_stats import close_local_clusters

            close_local_clusters()
        self.catalogue.dispose()
