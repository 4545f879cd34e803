from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARTIFACTS = Path(os.environ.get("CKPTSCOPE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# --- the catalogue database ------------------------------------------------------------------
# By default every app a test makes keeps its catalogue in SQLite inside its data directory. With
# CKPTSCOPE_TEST_DATABASE_URL (an admin URL of a PostgreSQL server; scripts/with-postgres.sh sets
# it) each test gets a fresh PostgreSQL database instead, through CKPTSCOPE_DATABASE_URL, which
# in-process apps and server subprocesses alike read.

ADMIN_URL = os.environ.get("CKPTSCOPE_TEST_DATABASE_URL")
_made: list[str] = []


def fresh_database_url() -> str | None:
    """A new empty PostgreSQL database's URL, or None when the tests run on SQLite."""
    if not ADMIN_URL:
        return None
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"ckptscope_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    _made.append(name)
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def database_env() -> dict[str, str]:
    """Environment for a server subprocess: its own fresh database when on PostgreSQL."""
    url = fresh_database_url()
    return {"CKPTSCOPE_DATABASE_URL": url} if url else {}


@pytest.fixture(autouse=True)
def _catalogue_database(monkeypatch):
    url = fresh_database_url()
    if url:
        monkeypatch.setenv("CKPTSCOPE_DATABASE_URL", url)
    yield


def pytest_sessionfinish(session, exitstatus):
    if not ADMIN_URL or not _made:
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in _made:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def pytest_report_header(config):
    return f"catalogue database: {'PostgreSQL (' + ADMIN_URL + ')' if ADMIN_URL else 'SQLite'}"
