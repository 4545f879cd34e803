"""The catalogue: checkpoints, their tensors (with cached stats) and background jobs.

SQLAlchemy 2; a SQLite file by default, PostgreSQL (or any SQLAlchemy URL) via settings; the
schema is made and upgraded by Alembic migrations (``migrate.py``, ``migrations/``). Tensor rows are
keyed by the checkpoint's *content key* (the sha256 of its bytes), so identical uploads
share one listing and one set of computed stats.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ckptscope.stats.model import STATISTICS


class StatsState(StrEnum):
    """Where a content's statistics stand."""

    PENDING = "pending"  # not computed yet (or handed back by a stopping server)
    RUNNING = "running"  # claimed by a server process (stats_owner), renewed by its heartbeat
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its checkpoint was deleted while it ran
    ABANDONED = "abandoned"  # its server stopped; a later job (the checkpoint's job_id) finishes the work


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Content(Base):
    """One distinct checkpoint content (a file or a sharded set), listed once."""

    __tablename__ = "contents"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(40))
    default_root: Mapped[str] = mapped_column(Text, default="")
    roots: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    warnings: Mapped[list[str]] = mapped_column(JSON)
    tensor_count: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    module_types: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # module path -> class
    pickle_report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # optimizer state tensor -> its parameter (full names), where the file tells it
    param_of: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    stats_state: Mapped[str] = mapped_column(String(16), default=StatsState.PENDING)  # a StatsState
    stats_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # which server process computes the stats, and when it last said so (processes share the catalogue)
    stats_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stats_heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(Text)
    content_key: Mapped[str] = mapped_column(ForeignKey("contents.key"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    origin: Mapped[str] = mapped_column(String(16), default="upload")  # upload|copy|export|reference
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


# One nullable column per declared statistic (ckptscope.stats.model.STATISTICS).
StatsColumns: Any = type(
    "StatsColumns",
    (),
    {s.name: mapped_column(Float if s.is_float else BigInteger, nullable=True) for s in STATISTICS},
)


class TensorRow(StatsColumns, Base):  # type: ignore[misc]
    __tablename__ = "tensors"
    content_key: Mapped[str] = mapped_column(ForeignKey("contents.key"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    dtype: Mapped[str] = mapped_column(String(20))
    shape: Mapped[str] = mapped_column(Text)  # JSON list
    stride: Mapped[str] = mapped_column(Text)  # JSON list
    numel: Mapped[int] = mapped_column(BigInteger)
    nbytes: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(10))
    alias_of: Mapped[str | None] = mapped_column(Text, nullable=True)
    file_sha: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    storage_byte_offset: Mapped[int] = mapped_column(BigInteger)
    storage_nbytes: Mapped[int] = mapped_column(BigInteger)
    storage_offset: Mapped[int] = mapped_column(BigInteger)  # elements
    kind_source: Mapped[str] = mapped_column(String(8), default="name")  # "file" | "name"
    encoding: Mapped[str | None] = mapped_column(String(32), nullable=True)  # GGUF quantisation
    file_dtype: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the file's type name
    pieces: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: a stitched tensor's chunks
    quant: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: a quantized tensor's scheme
    # ... the statistics' columns (StatsColumns), then:
    hist: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON {bins, min, max, note, percentiles, log}
    digest: Mapped[str | None] = mapped_column(String(48), nullable=True, index=True)  # TensorStats.digest
    init: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: TensorStats.init

    __table_args__ = (Index("ix_tensors_content_name", "content_key", "name"),)


class ModuleDigestRow(Base):
    """A module's content digest (its members under their relative names, ``insights.identity``)."""

    __tablename__ = "module_digests"
    content_key: Mapped[str] = mapped_column(ForeignKey("contents.key"), primary_key=True)
    module: Mapped[str] = mapped_column(Text, primary_key=True)  # full module path ("" for the root)
    digest: Mapped[str] = mapped_column(String(48), index=True)
    tensor_count: Mapped[int] = mapped_column(Integer)


class FileRef(Base):
    """Which blobs a content is made of (a blob may serve several contents)."""

    __tablename__ = "file_refs"
    content_key: Mapped[str] = mapped_column(ForeignKey("contents.key"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class SourceObject(Base):
    """An object a referenced checkpoint is read from, as its store described it when listed. The
    key (sha256 of the URL and that identity) stands where an upload's file rows name a blob hash;
    a changed object is another key, so a row never changes once written."""

    __tablename__ = "source_objects"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    identity: Mapped[dict[str, Any]] = mapped_column(JSON)  # ObjectIdentity.to_json()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16))
    content_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)  # a JobState
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LoginSession(Base):
    """A browser login (when ``CKPTSCOPE_API_TOKEN`` is set). The cookie holds a random id; only its
    sha256 is stored, with a fingerprint of the token it was opened with (a new token ends it) and
    when it expires. Logging out deletes the row; processes sharing the catalogue share the rows."""

    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class IdempotencyKey(Base):
    """An upload's ``Idempotency-Key``: the checkpoint its first request made and a fingerprint of
    that request's files and name, so a retry returns that checkpoint and a reuse with another
    request is refused. The key is the primary key: two processes racing on one key conflict, and
    the loser's transaction runs again and finds the winner's row. Kept while the checkpoint is."""

    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class Catalogue:
    def __init__(self, url: str) -> None:
        from .migrate import upgrade

        self.engine = make_engine(url)
        upgrade(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def ping(self) -> None:
        """Raises when the database does not answer."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


T = TypeVar("T")


def retry_conflicts(transaction: Callable[[], T], attempts: int = 5) -> T:
    """Run a transaction again when another process's concurrent write made it conflict: a unique
    or foreign key violation (IntegrityError), or SQLite's busy/locked database (OperationalError).
    Each attempt must be a whole transaction that reads afresh."""
    for attempt in range(attempts):
        try:
            return transaction()
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts - 1 or (isinstance(exc, OperationalError) and not _is_busy(exc)):
                raise
            time.sleep(0.01 * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def _is_busy(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text or "deadlock" in text or "could not serialize" in text


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
