"""Schema migrations (alembic) on the catalogue's database: several processes migrating at once,
the migrations building exactly the models' schema, and catalogues from before migrations adopted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from ckptscope.config import Settings
from ckptscope.store.catalogue import Base, make_engine
from ckptscope.store.migrate import head_revision, upgrade
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e


def test_processes_starting_together_migrate_the_schema_once(shared):
    data, env = shared
    data.mkdir(parents=True)
    full_env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(data), **env}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ckptscope.cli", "migrate"],
            env=full_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert all(f"revision {head_revision()}" in out for out in outputs)


def test_migrations_build_exactly_the_models_schema(shared):
    url = shared[1].get("CKPTSCOPE_DATABASE_URL") or Settings(data_dir=shared[0]).resolved_database_url
    shared[0].mkdir(parents=True)
    engine = make_engine(url)
    try:
        assert upgrade(engine) == head_revision()
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_a_catalogue_from_before_migrations_is_adopted_and_upgraded(shared):
    """Catalogues made by create_all (revision 0001's tables, no alembic_version) keep their rows."""
    from alembic import command

    from ckptscope.store.migrate import _config

    url = shared[1].get("CKPTSCOPE_DATABASE_URL") or Settings(data_dir=shared[0]).resolved_database_url
    shared[0].mkdir(parents=True)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            command.upgrade(_config(conn), "0001")
            conn.execute(text("DROP TABLE alembic_version"))
            conn.execute(
                text(
                    "INSERT INTO contents (key, format, default_root, roots, meta, warnings, tensor_count,"
                    " total_bytes, stats_state) VALUES ('k', 'safetensors', '', '[]', '{}', '[]', 0, 0, 'done')"
                )
            )
            conn.commit()
        assert upgrade(engine) == head_revision()
        with engine.connect() as conn:
            # kept, and its statistics (from before percentiles and digests, revision 0005) are due again
            assert conn.execute(text("SELECT stats_state FROM contents WHERE key = 'k'")).scalar() == "pending"
            columns = {c["name"] for c in inspect(conn).get_columns("contents")}
            assert {"stats_owner", "stats_heartbeat"} <= columns
    finally:
        engine.dispose()
