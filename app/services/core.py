"""The one object that holds the service's state: settings, blob store, catalogue, jobs."""

from __future__ import annotations

from app.config import Settings
from app.jobs.runner import JobRunner
from app.metrics import Metrics
from app.store.blobs import BlobStore
from app.store.catalogue import Catalogue


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(settings.data_dir)
        self.blobs.clean_tmp()
        self.catalogue = Catalogue(settings.resolved_database_url)
        self.jobs = JobRunner(self)

    def start(self) -> None:
        self.jobs.start()

    def close(self) -> None:
        self.jobs.shutdown()
        self.catalogue.dispose()
