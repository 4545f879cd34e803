"""Helpers shared by test modules: the repository root, the catalogue database a test runs on, an
in-process app and the calls most API tests make, and the two-part model the operation tests use."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from torch import nn

from ckptscope.config import Settings
from ckptscope.main import create_app

ROOT = Path(__file__).resolve().parent.parent

# --- the catalogue database ------------------------------------------------------------------
# By default every app a test makes keeps its catalogue in SQLite inside its data directory. With
# CKPTSCOPE_TEST_DATABASE_URL (an admin URL of a PostgreSQL server; scripts/with-postgres.sh sets
# it) each test gets a fresh, empty PostgreSQL schema of its own instead (in one database made for
# the session: a schema costs milliseconds, a database a tenth of a second), through
# CKPTSCOPE_DATABASE_URL, whose search_path names it; in-process apps and server subprocesses alike
# read it (tests/conftest.py sets it for each test and drops the database at the end).

ADMIN_URL = os.environ.get("CKPTSCOPE_TEST_DATABASE_URL")
made_databases: list[str] = []
_session_engine: list[Any] = []  # [the session database's URL, an engine on it]


def _session_database() -> tuple[str, Any]:
    from sqlalchemy import create_engine, make_url, text

    if not _session_engine:
        assert ADMIN_URL
        name = f"ckptscope_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        made_databases.append(name)
        url = make_url(ADMIN_URL).set(database=name)
        _session_engine.extend([url, create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1)])
    return _session_engine[0], _session_engine[1]


def fresh_database_url() -> str | None:
    """The URL of a new, empty PostgreSQL schema (first on its search_path), or None when the
    tests run on SQLite."""
    if not ADMIN_URL:
        return None
    from sqlalchemy import text

    url, engine = _session_database()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    query = dict(url.query) | {"options": f"-csearch_path={schema}"}
    return str(url.set(query=query).render_as_string(hide_password=False))


def dispose_session_database() -> None:
    if _session_engine:
        _session_engine.pop().dispose()
        _session_engine.clear()


def database_env() -> dict[str, str]:
    """Environment for a server subprocess: its own fresh database when on PostgreSQL."""
    url = fresh_database_url()
    return {"CKPTSCOPE_DATABASE_URL": url} if url else {}


# --- an in-process app -----------------------------------------------------------------------


def make_client(data_dir: Path, base_url: str = "http://localhost", **settings) -> TestClient:
    """An in-process app. Its requests name ``localhost`` (one of the default CKPTSCOPE_ALLOWED_HOSTS),
    not the TestClient's own ``testserver``, so tests run on the default settings."""
    return TestClient(create_app(Settings(data_dir=data_dir, **settings)), base_url=base_url)


def csrf_token(client) -> str:
    """The anti-CSRF token of a client (a browser has it from the first page it loads)."""
    if "ckptscope_csrf" not in client.cookies:
        client.get("/login" if client.app.state.core.settings.api_token else "/")
    return client.cookies["ckptscope_csrf"]


def upload(client, path: Path, name: str | None = None, **kwargs):
    with path.open("rb") as fh:
        return client.post("/api/v1/checkpoints", files={"file": (name or path.name, fh)}, **kwargs)


def wait_stats(client, checkpoint_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()
        if body["stats_state"] in ("done", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError("stats did not finish")


# --- models for copy, freeze, export and diff ------------------------------------------------


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.nn_same = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.nn_same(x))


def models(seed_a: int = 1, seed_b: int = 2) -> tuple[TwoPart, TwoPart]:
    torch.manual_seed(seed_a)
    a = TwoPart()
    a.train()
    a(torch.randn(8, 4))  # BatchNorm running stats differ from b's
    torch.manual_seed(seed_b)
    b = TwoPart()
    return a, b


def assert_state_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def assert_one_line_refusal(out: subprocess.CompletedProcess[str], *fragments: str, status: int = 3) -> None:
    """A CLI refusal: exit ``status`` (3: unreadable input; 2: usage), one line on stderr naming
    the problem, no traceback."""
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("ckptscope: "), out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr


# --- Prometheus metrics ------------------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition (the format must parse)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value; a missing sample is a KeyError (absent never reads as 0)."""
    return metric_samples(text)[(name, frozenset(labels.items()))]
