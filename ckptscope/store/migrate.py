"""Schema migrations (Alembic), run at start-up by every server process and by `ckptscope migrate`.

Several processes may start at once against one database, so the upgrade runs under a lock: a
PostgreSQL advisory lock, or for SQLite an flock on a file beside the database. A catalogue made
by an earlier build without Alembic (tables but no ``alembic_version``) is stamped as the first
revision, then upgraded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from .file_lock import file_lock

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
FIRST_REVISION = "0001"
_PG_LOCK_ID = 0x636B7074  # "ckpt": the advisory lock id of schema migrations


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()
        return
    database = engine.url.database
    lock_path = Path(f"{database}.migrate-lock") if database and database != ":memory:" else None
    if lock_path is None:
        with engine.connect() as conn:
            yield conn
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)  # a first `ckptscope migrate` on a new data dir
    with file_lock(lock_path), engine.connect() as conn:
        yield conn


def upgrade(engine: Engine) -> str:
    """Bring the catalogue's schema to the newest revision; returns it."""
    with _migration_lock(engine) as conn:
        if current_revision(conn) is None and inspect(conn).has_table("contents"):
            command.stamp(_config(conn), FIRST_REVISION)  # made by create_all before migrations existed
            conn.commit()
        command.upgrade(_config(conn), "head")
        conn.commit()
        revision = current_revision(conn)
    assert revision is not None
    return revision
