"""The catalogue runs on the database asked for: SQLite in the data directory, or PostgreSQL under
scripts/with-postgres.sh."""

from __future__ import annotations

import pytest

from ckptscope.config import Settings
from ckptscope.store.catalogue import Catalogue
from tests.helpers import ADMIN_URL

pytestmark = pytest.mark.e2e


def test_the_catalogue_backend_is_the_one_asked_for(shared):
    url = shared[1].get("CKPTSCOPE_DATABASE_URL")
    shared[0].mkdir(parents=True)
    catalogue = Catalogue(url or Settings(data_dir=shared[0]).resolved_database_url)
    try:
        assert catalogue.engine.dialect.name == ("postgresql" if ADMIN_URL else "sqlite")
    finally:
        catalogue.dispose()
