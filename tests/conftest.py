from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_root = str(Path(__file__).resolve().parent.parent)  # so that `tests.` imports work however pytest is started
if _root not in sys.path:
    sys.path.insert(0, _root)

from tests.helpers import (  # noqa: E402
    ADMIN_URL,
    ROOT,
    database_env,
    dispose_session_database,
    fresh_database_url,
    made_databases,
    make_client,
)
from tests.s3_server import s3, s3_auth_server, s3_server  # noqa: E402, F401  (fixtures: a real S3 server)

ARTIFACTS = Path(os.environ.get("CKPTSCOPE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


# --- the catalogue database (tests/helpers.py says how it is chosen) ---------------------------


@pytest.fixture(autouse=True)
def _catalogue_database(monkeypatch):
    url = fresh_database_url()
    if url:
        monkeypatch.setenv("CKPTSCOPE_DATABASE_URL", url)
    yield


def pytest_sessionfinish(session, exitstatus):
    dispose_session_database()
    if not ADMIN_URL or not made_databases:
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in made_databases:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def pytest_report_header(config):
    return f"catalogue database: {'PostgreSQL (' + ADMIN_URL + ')' if ADMIN_URL else 'SQLite'}"


# --- an in-process app on a real catalogue and blob directory ---------------------------------


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def client(data_dir):
    with make_client(data_dir) as c:
        yield c


# --- several processes sharing one data directory and catalogue -------------------------------


@pytest.fixture
def shared(tmp_path):
    """One data directory and one catalogue for every server or process a test starts."""
    return tmp_path / "data", database_env()
