"""The catalogue's queries and the mapping between its rows and the records the rest of ckptscope
uses (``TensorInfo``, ``TensorStats``). Routes and services ask this object; nothing above the
store writes SQL."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from sqlalchemy import Table, bindparam, delete, func, select, update

from ckptscope.errors import Invalid, NotFound
from ckptscope.formats.model import Checkpoint as Listing
from ckptscope.formats.model import (
    Piece,
    StorageRef,
    TensorInfo,
    quant_from_json,
    quant_to_json,
    relative_name,
    resolve_root,
)
from ckptscope.stats.model import STATISTICS, LogHistogram, TensorStats, finite_or_none
from ckptscope.stats.tree import NonFiniteCounts, build_tree

from .blobs import BlobStore
from .catalogue import (
    Catalogue,
    Checkpoint,
    Content,
    FileRef,
    IdempotencyKey,
    Job,
    LoginSession,
    ModuleDigestRow,
    SourceObject,
    StatsState,
    TensorRow,
    dumps,
    retry_conflicts,
    utcnow,
)

SORTABLE = ("position", "name", "numel", "nbytes", *(s.name for s in STATISTICS))
# A tensor row as the readers below get it: the tensors table's columns by name (a Core select's
# row mapping; building ORM objects for 50,000 rows costs more than everything else a page does).
TensorColumns = Mapping[Any, Any]


@dataclass(frozen=True, slots=True)
class StoredFile:
    name: str  # display name within the checkpoint
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A referenced object as listed: its key (``StoredFile.sha256`` names it), URL, size and what
    its store said about it (``ObjectIdentity.to_json()``)."""

    key: str
    url: str
    size: int
    identity: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DigestHit:
    """A tensor or module of a catalogue checkpoint found by its digest."""

    checkpoint: Checkpoint
    content: Content
    name: str  # full name (from the whole file's root): tensor name or module path
    size: int  # the tensor's element count, or the module's tensor count


@dataclass(slots=True)
class TensorPage:
    total: int
    rows: list[tuple[TensorInfo, TensorStats | None]]


class KeyTaken(Exception):
    """``register`` found its idempotency key taken by a request with the same fingerprint: the
    checkpoint that request made (nothing was registered)."""

    def __init__(self, checkpoint_id: str) -> None:
        super().__init__(checkpoint_id)
        self.checkpoint_id = checkpoint_id


def key_reused() -> Invalid:
    return Invalid(
        "this Idempotency-Key was sent before with a different upload (other files or another name); "
        "use a new key for a new upload",
        "idempotency-key-reused",
    )


def _like_prefix(prefix: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


class CatalogueQueries:
    def __init__(self, catalogue: Catalogue, blobs: BlobStore) -> None:
        self.catalogue = catalogue
        self.blobs = blobs
        self._locations: dict[str, str] = {}  # file key -> where its bytes are (``location``)

    # --- checkpoints --------------------------------------------------------------------------

    def get_checkpoint(self, checkpoint_id: str) -> tuple[Checkpoint, Content]:
        with self.catalogue.session() as session:
            row = session.get(Checkpoint, checkpoint_id)
            if row is None:
                raise NotFound(f"no checkpoint with id {checkpoint_id!r}")
            content = session.get(Content, row.content_key)
            assert content is not None  # a foreign key
            return row, content

    def list_checkpoints(self) -> list[tuple[Checkpoint, Content]]:
        with self.catalogue.session() as session:
            rows = session.execute(
                select(Checkpoint, Content)
                .join(Content, Checkpoint.content_key == Content.key)
                .order_by(Checkpoint.created_at.desc())
            )
            return [(c, k) for c, k in rows]

    def checkpoint_page(self, *, offset: int, limit: int) -> tuple[int, list[tuple[Checkpoint, Content]]]:
        """How many checkpoints there are, and ``limit`` of them from ``offset``, newest first."""
        stmt = (
            select(Checkpoint, Content)
            .join(Content, Checkpoint.content_key == Content.key)
            .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
            .offset(offset)
            .limit(limit)
        )
        with self.catalogue.session() as session:
            total = session.scalar(select(func.count()).select_from(Checkpoint)) or 0
            return total, [(c, k) for c, k in session.execute(stmt)]

    def checkpoint_for_key(self, key: str, fingerprint: str) -> Checkpoint | None:
        """The checkpoint an upload with this idempotency key made, None when the key is new;
        ``idempotency-key-reused`` (422) when it was sent with another request's fingerprint."""
        with self.catalogue.session() as session:
            taken = session.get(IdempotencyKey, key)
            if taken is None:
                return None
            if not hmac.compare_digest(taken.fingerprint, fingerprint):
                raise key_reused()
            return session.get(Checkpoint, taken.checkpoint_id)

    def rename_checkpoint(self, checkpoint_id: str, name: str) -> None:
        """Give a checkpoint a new label (its content, files and id stay)."""
        stmt = update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(name=name)
        with self.catalogue.engine.begin() as conn:
            if conn.execute(stmt).rowcount == 0:
                raise NotFound(f"no checkpoint with id {checkpoint_id!r}")

    def files_of(self, content_key: str) -> list[FileRef]:
        with self.catalogue.session() as session:
            stmt = select(FileRef).where(FileRef.content_key == content_key).order_by(FileRef.name)
            return list(session.scalars(stmt))

    def register(
        self,
        key: str,
        listing: Listing,
        files: Sequence[StoredFile],
        sha_of_path: dict[str, str],
        *,
        name: str,
        origin: str,
        provenance: dict[str, Any] | None,
        idempotency: tuple[str, str] | None = None,
        sources: Sequence[SourceRecord] = (),
        checkpoint: bool = True,
    ) -> tuple[Checkpoint, Content]:
        """Add a checkpoint row named ``name`` for the content ``key``, and the content
        with its files and tensor rows unless it is listed already. Another process may register
        the same content at the same moment (the loser's insert conflicts) or delete it (the
        checkpoint's reference fails): then the whole transaction runs again. ``idempotency``:
        (key, request fingerprint) recorded with the new checkpoint; a key taken already raises
        ``KeyTaken`` (same fingerprint) or ``idempotency-key-reused`` (another one), and nothing is
        registered. ``sources``: the referenced objects the files name (a checkpoint opened where it
        lives). ``checkpoint=False``: the content only (a referenced checkpoint's source changed; the
        returned checkpoint row is then a transient one, not stored)."""

        def transaction() -> tuple[Checkpoint, Content]:
            with self.catalogue.session() as session, session.begin():
                if idempotency is not None:
                    taken = session.get(IdempotencyKey, idempotency[0])
                    if taken is not None:
                        if not hmac.compare_digest(taken.fingerprint, idempotency[1]):
                            raise key_reused()
                        raise KeyTaken(taken.checkpoint_id)
                for source in sources:
                    if session.get(SourceObject, source.key) is None:
                        session.add(
                            SourceObject(key=source.key, url=source.url, size=source.size, identity=source.identity)
                        )
                content = session.get(Content, key)
                if content is None:
                    content = Content(
                        key=key,
                        format=listing.format,
                        default_root=listing.default_root,
                        roots=[{"path": r.path, "tensor_count": r.tensor_count} for r in listing.roots],
                        meta=listing.metadata,
                        warnings=listing.warnings,
                        tensor_count=len(listing.tensors),
                        total_bytes=build_tree(listing.tensors).nbytes,
                        module_types=listing.module_types,
                        pickle_report=listing.pickle,
                        param_of=listing.param_of,
                        stats_state=StatsState.PENDING,
                    )
                    session.add(content)
                    session.flush()
                    session.add_all(FileRef(content_key=key, name=f.name, sha256=f.sha256, size=f.size) for f in files)
                    if listing.tensors:
                        session.execute(_tensors_table().insert(), _tensor_rows(key, listing, sha_of_path))
                row = Checkpoint(
                    name=name,
                    content_key=key,
                    size_bytes=sum(f.size for f in files),
                    origin=origin,
                    provenance=provenance,
                )
                if not checkpoint:
                    return row, content
                session.add(row)
                if idempotency is not None:  # a concurrent request with this key conflicts here
                    session.flush()
                    session.add(IdempotencyKey(key=idempotency[0], fingerprint=idempotency[1], checkpoint_id=row.id))
            return row, content

        return retry_conflicts(transaction)

    def delete_checkpoint(self, checkpoint_id: str, on_last_reference: Callable[[str], None]) -> list[str]:
        """Delete a checkpoint; when it was the last one of its content, the content too (after
        ``on_last_reference(content_key)``). Returns the blobs the deleted content referenced. A
        concurrent upload of the same content may add a checkpoint meanwhile: then it is kept."""

        def transaction() -> list[str]:
            with self.catalogue.session() as session, session.begin():
                row = session.get(Checkpoint, checkpoint_id)
                if row is None:
                    raise NotFound(f"no checkpoint with id {checkpoint_id!r}")
                key = row.content_key
                session.execute(delete(IdempotencyKey).where(IdempotencyKey.checkpoint_id == checkpoint_id))
                session.delete(row)
                session.flush()
                others = session.scalar(
                    select(func.count()).select_from(Checkpoint).where(Checkpoint.content_key == key)
                )
                if others:
                    return []
                on_last_reference(key)
                return _delete_content(session, key)

        return retry_conflicts(transaction)

    def blob_referenced(self, sha: str) -> bool:
        with self.catalogue.session() as session:  # a fresh transaction: sees what others committed
            stmt = select(func.count()).select_from(FileRef).where(FileRef.sha256 == sha)
            return (session.scalar(stmt) or 0) > 0

    # --- tensors ------------------------------------------------------------------------------

    def location(self, file_key: str) -> str:
        """Where a file row's bytes are: an uploaded blob's path, a referenced local file's path, or
        a referenced object's URL (``s3://...``). Keys never change meaning, so answers are kept."""
        found = self._locations.get(file_key)
        if found is None:
            with self.catalogue.session() as session:
                source = session.get(SourceObject, file_key)
            found = str(self.blobs.path_for(file_key)) if source is None else source_location(source.url)
            if len(self._locations) < 100_000:
                self._locations[file_key] = found
        return found

    def source_objects(self, content_key: str) -> list[SourceObject]:
        """The referenced objects a content is read from (none for an upload), by file name."""
        stmt = (
            select(SourceObject)
            .join(FileRef, FileRef.sha256 == SourceObject.key)
            .where(FileRef.content_key == content_key)
            .order_by(FileRef.name)
        )
        with self.catalogue.session() as session:
            return list(session.scalars(stmt))

    def repoint_checkpoint(self, checkpoint_id: str, content_key: str, provenance: dict[str, Any]) -> str | None:
        """Point a referenced checkpoint at the content its changed source now lists as; returns the
        content it left (for the caller to discard when nothing else uses it)."""

        def transaction() -> str | None:
            with self.catalogue.session() as session, session.begin():
                row = session.get(Checkpoint, checkpoint_id)
                if row is None:
                    raise NotFound(f"no checkpoint with id {checkpoint_id!r}")
                old = row.content_key
                row.content_key = content_key
                row.provenance = provenance
                row.size_bytes = sum(session.scalars(select(FileRef.size).where(FileRef.content_key == content_key)))
                return old if old != content_key else None

        return retry_conflicts(transaction)

    def drop_content_if_unused(self, content_key: str, on_last_reference: Callable[[str], None]) -> list[str]:
        """Delete a content that no checkpoint names any more (a referenced checkpoint moved on to
        its source's new content); returns its files' keys."""

        def transaction() -> list[str]:
            with self.catalogue.session() as session, session.begin():
                users = session.scalar(
                    select(func.count()).select_from(Checkpoint).where(Checkpoint.content_key == content_key)
                )
                if users or session.get(Content, content_key) is None:
                    return []
                on_last_reference(content_key)
                return _delete_content(session, content_key)

        return retry_conflicts(transaction)

    def row_to_info(self, row: TensorColumns, root: str = "") -> TensorInfo:
        storage = StorageRef(
            self.location(row["file_sha"]), row["storage_byte_offset"], row["storage_nbytes"], row["storage_key"]
        )
        return TensorInfo(
            relative_name(row["name"], root) or row["name"],
            row["dtype"],
            int_tuple(row["shape"]),
            int_tuple(row["stride"]),
            row["storage_offset"],
            storage,
            row["kind"],
            relative_name(row["alias_of"], root) if row["alias_of"] else None,
            row["kind_source"],
            row["encoding"],
            row["file_dtype"],
            self._pieces_from_json(row["name"], row["pieces"]),
            quant_from_json(json.loads(row["quant"]), self._part_from_json) if row["quant"] else None,
        )

    def _part_from_json(self, data: list[Any], name: str = "") -> TensorInfo:
        """A part of a tensor row (a chunk, a scale tensor) as ``_part_to_json`` stored it."""
        dtype, shape, stride, soff, sha, off, nbytes, key = data
        storage = StorageRef(self.location(sha), off, nbytes, key)
        return TensorInfo(name, dtype, tuple(shape), tuple(stride), soff, storage)

    def _pieces_from_json(self, name: str, text: str | None) -> tuple[Piece, ...]:
        if not text:
            return ()
        return tuple(Piece(tuple(row[0]), self._part_from_json(row[1:], name)) for row in json.loads(text))

    def tensor_page(self, content: Content, root: str, **query: Any) -> TensorPage:
        """A page of a root's tensors with their stats (``tensor_rows`` says which)."""
        total, rows = self.tensor_rows(content, root, **query)
        return TensorPage(total, [(self.row_to_info(r, root), row_to_stats(r)) for r in rows])

    def tensor_rows(self, content: Content, root: str, **query: Any) -> tuple[int, list[TensorColumns]]:
        """How many tensors of a root match ``query`` (``_page_query``), and the page of them as
        plain rows of the tensors table (``row_to_info``/``row_to_stats`` map them; the API's page
        writes them straight from their columns)."""
        base, order, offset, limit = _page_query(_tensor_columns(), content, root, **query)
        with self.catalogue.session() as session:
            total = session.scalar(select(func.count()).select_from(base.subquery()))
            rows: list[TensorColumns] = [
                r._mapping for r in session.execute(base.order_by(*order).offset(offset).limit(limit))
            ]
        return total or 0, rows

    def tensor_positions(self, content: Content, root: str, **query: Any) -> tuple[int, list[int]]:
        """``tensor_rows`` as the rows' positions only (for a caller that has the rows already)."""
        base, order, offset, limit = _page_query(select(TensorRow.position), content, root, **query)
        with self.catalogue.session() as session:
            total = session.scalar(select(func.count()).select_from(base.subquery()))
            positions = list(session.scalars(base.order_by(*order).offset(offset).limit(limit)))
        return total or 0, positions

    def tensor_rows_at(self, content: Content, positions: Sequence[int]) -> list[TensorColumns]:
        """The rows of a content's tensors at these positions (in no particular order)."""
        rows: list[TensorColumns] = []
        with self.catalogue.session() as session:
            for i in range(0, len(positions), 5000):  # bound the statement's parameters
                chunk = positions[i : i + 5000]
                stmt = _tensor_columns().where(TensorRow.content_key == content.key, TensorRow.position.in_(chunk))
                rows += [r._mapping for r in session.execute(stmt)]
        return rows

    def tensor_detail(self, content: Content, root: str, name: str) -> tuple[TensorInfo, TensorStats | None]:
        full = f"{root}.{name}" if root else name
        with self.catalogue.session() as session:
            found = session.execute(
                _tensor_columns().where(TensorRow.content_key == content.key, TensorRow.name == full).limit(1)
            ).first()
        if found is None:
            raise NotFound(f"no tensor named {name!r} under root {root!r}")
        return self.row_to_info(found._mapping, root), row_to_stats(found._mapping)

    def all_tensors(self, content: Content, root: str = "") -> list[tuple[TensorInfo, TensorStats | None]]:
        with self.catalogue.session() as session:
            stmt = _root_filter(_tensor_columns(), content, root).order_by(TensorRow.position)
            rows = [r._mapping for r in session.execute(stmt)]
        return [(self.row_to_info(r, root), row_to_stats(r)) for r in rows]

    def tree_inputs(self, content: Content, root: str = "") -> tuple[list[TensorInfo], dict[str, NonFiniteCounts]]:
        """What a module tree of a root is built from: its tensors in file order, and the NaN and Inf
        counts of those that have any (the rest of their stats is neither read nor parsed)."""
        listed = [c for c in _tensors_table().c if c.name not in ("hist", "init", "digest")]
        stmt = _root_filter(select(*listed), content, root).order_by(TensorRow.position)
        with self.catalogue.session() as session:
            rows = [r._mapping for r in session.execute(stmt)]
        tensors = [self.row_to_info(r, root) for r in rows]
        counts = {
            t.name: NonFiniteCounts(r["nan"], r["inf"])
            for t, r in zip(tensors, rows, strict=True)
            if r["nan"] or r["inf"]
        }
        return tensors, counts

    def module_types_of(self, content_key: str) -> dict[str, str]:
        """The classes of a content's pickled modules (full module path -> class), {} if none."""
        with self.catalogue.session() as session:
            found = session.scalar(select(Content.module_types).where(Content.key == content_key))
        return dict(found or {})

    def stats_inputs(self, content_key: str) -> list[tuple[int, TensorInfo]]:
        """Every tensor of a content with its position, full names: what a stats job reads."""
        with self.catalogue.session() as session:
            rows = session.execute(_tensor_columns().where(TensorRow.content_key == content_key))
            return [(r.position, self.row_to_info(r._mapping)) for r in rows]

    def save_stats(self, content_key: str, stats_by_position: dict[int, TensorStats]) -> int:
        """Write computed stats; returns how many rows were updated (0 when the content is gone)."""
        if not stats_by_position:
            return 0
        params = []
        for position, s in stats_by_position.items():
            param: dict[str, Any] = {"k": content_key, "p": position}
            for stat in STATISTICS:
                v = getattr(s, stat.name)
                param[stat.name] = finite_or_none(v) if stat.is_float else v
            hist = {
                "bins": s.hist,
                "min": finite_or_none(s.hist_min),
                "max": finite_or_none(s.hist_max),
                "note": s.note,
                "percentiles": s.percentiles,
                "log": None if s.log_hist is None else s.log_hist.to_json(),
            }
            param["hist"] = dumps(hist)
            param["digest"] = s.digest
            param["init"] = None if s.init is None else dumps(s.init)
            params.append(param)
        table = _tensors_table()
        values: dict[str, Any] = {
            name: bindparam(name) for name in (*(s.name for s in STATISTICS), "hist", "digest", "init")
        }
        stmt = (
            update(table)
            .where(table.c.content_key == bindparam("k"), table.c.position == bindparam("p"))
            .values(**values)
        )
        with self.catalogue.engine.begin() as conn:
            updated = conn.execute(stmt, params).rowcount
            if updated:
                _save_module_digests(conn, content_key)
            return updated

    # --- content identity (digests) -----------------------------------------------------------

    def tensors_by_digest(
        self, digest: str, *, limit: int, exclude: tuple[str, str] | None = None
    ) -> tuple[int, list[DigestHit]]:
        """Every catalogue tensor with this digest, one hit per checkpoint naming it (oldest
        checkpoint first), at most ``limit``, and how many there are. ``exclude``: (checkpoint id,
        full tensor name) left out (the tensor asked about)."""
        return self._by_digest(TensorRow, TensorRow.name, TensorRow.position, digest, limit, exclude)

    def modules_by_digest(
        self, digest: str, *, limit: int, exclude: tuple[str, str] | None = None
    ) -> tuple[int, list[DigestHit]]:
        """Every catalogue module with this digest (``insights.identity``), as ``tensors_by_digest``."""
        return self._by_digest(ModuleDigestRow, ModuleDigestRow.module, ModuleDigestRow.module, digest, limit, exclude)

    def module_digests_of(self, content_key: str, prefix: str = "") -> dict[str, str]:
        """A content's module digests (full module path -> digest), those at or under ``prefix``."""
        stmt = select(ModuleDigestRow.module, ModuleDigestRow.digest).where(ModuleDigestRow.content_key == content_key)
        if prefix:
            inside = ModuleDigestRow.module.like(_like_prefix(prefix + "."), escape="\\")
            stmt = stmt.where((ModuleDigestRow.module == prefix) | inside)
        with self.catalogue.session() as session:
            return dict(session.execute(stmt).tuples().all())

    def _by_digest(
        self, table: Any, name: Any, order: Any, digest: str, limit: int, exclude: tuple[str, str] | None
    ) -> tuple[int, list[DigestHit]]:
        count = TensorRow.numel if table is TensorRow else ModuleDigestRow.tensor_count
        stmt = (
            select(Checkpoint, Content, name, count)
            .join(Content, Checkpoint.content_key == Content.key)
            .join(table, table.content_key == Checkpoint.content_key)
            .where(table.digest == digest)
        )
        if exclude is not None:
            stmt = stmt.where(~((Checkpoint.id == exclude[0]) & (name == exclude[1])))
        with self.catalogue.session() as session:
            total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = session.execute(stmt.order_by(Checkpoint.created_at, Checkpoint.id, order).limit(limit)).all()
        return total, [DigestHit(c, k, n, int(m)) for c, k, n, m in rows]

    # --- jobs ---------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        with self.catalogue.session() as session:
            job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        return job

    def jobs_for(self, content_keys: Sequence[str]) -> dict[str, str]:
        """The newest stats job of each content that has one, in one query."""
        newest: dict[str, str] = {}
        with self.catalogue.session() as session:
            stmt = (
                select(Job.content_key, Job.id).where(Job.content_key.in_(set(content_keys))).order_by(Job.created_at)
            )
            for key, job_id in session.execute(stmt):
                if key is not None:
                    newest[key] = job_id  # ascending: the last one seen is the newest
        return newest

    # --- browser sessions ---------------------------------------------------------------------

    def create_session(self, id_hash: str, token_fingerprint: str, expires_at: datetime) -> None:
        """Store a login (the hash of its cookie id); expired ones are removed on the way."""

        def transaction() -> None:
            with self.catalogue.session() as session, session.begin():
                session.execute(delete(LoginSession).where(LoginSession.expires_at <= utcnow()))
                session.add(LoginSession(id_hash=id_hash, token_fingerprint=token_fingerprint, expires_at=expires_at))

        retry_conflicts(transaction)

    def session_valid(self, id_hash: str, token_fingerprint: str) -> bool:
        """Whether a login exists, has not expired and was opened with the current token."""
        with self.catalogue.session() as session:
            stmt = select(LoginSession.token_fingerprint).where(
                LoginSession.id_hash == id_hash, LoginSession.expires_at > utcnow()
            )
            stored = session.scalar(stmt)
        return stored is not None and hmac.compare_digest(stored, token_fingerprint)

    def revoke_session(self, id_hash: str) -> None:
        with self.catalogue.session() as session, session.begin():
            session.execute(delete(LoginSession).where(LoginSession.id_hash == id_hash))


def check_sort(sort: str) -> str:
    """A tensor list's sort column, or ``invalid`` (422)."""
    if sort not in SORTABLE:
        raise Invalid(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)}")
    return sort


def check_root(content: Content, root: str | None) -> str:
    """The root of ``content`` a request means (see ``resolve_root``)."""
    return resolve_root(root, content.default_root, [r["path"] for r in content.roots])


def int_tuple(text: str) -> tuple[int, ...]:
    """A stored shape or stride (``"[8,16]"``) as a tuple; a checkpoint repeats a few shapes
    thousands of times, so each text is parsed once."""
    return _parsed_ints(text)


@lru_cache(maxsize=4096)
def _parsed_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in json.loads(text))


def row_to_stats(row: TensorColumns) -> TensorStats | None:
    if row["hist"] is None:
        return None
    hist = json.loads(row["hist"])
    values: dict[str, Any] = {}
    for s in STATISTICS:
        v = row[s.name]
        values[s.name] = v if s.is_float else (v or 0)
    log = hist.get("log")
    return TensorStats(
        numel=row["numel"],
        hist=hist["bins"],
        hist_min=hist["min"],
        hist_max=hist["max"],
        note=hist.get("note"),
        percentiles=hist.get("percentiles"),
        log_hist=None if log is None else LogHistogram.from_json(log),
        digest=row["digest"],
        init=None if row["init"] is None else json.loads(row["init"]),
        **values,
    )


def _save_module_digests(conn: Any, content_key: str) -> None:
    """Replace a content's module digests by those of its tensors' current digests (modules with
    a tensor lacking one are left out)."""
    from ckptscope.insights.identity import module_identities

    named = conn.execute(select(TensorRow.name, TensorRow.digest).where(TensorRow.content_key == content_key)).all()
    rows = [
        {"content_key": content_key, "module": path, "digest": m.digest, "tensor_count": m.tensor_count}
        for path, m in module_identities((n, d) for n, d in named).items()
        if m.digest is not None and m.tensor_count
    ]
    conn.execute(delete(ModuleDigestRow).where(ModuleDigestRow.content_key == content_key))
    if rows:
        conn.execute(cast(Table, ModuleDigestRow.__table__).insert(), rows)


def _tensors_table() -> Table:
    return cast(Table, TensorRow.__table__)


def _tensor_columns() -> Any:
    """A select of every column of the tensors table, returning plain rows (``TensorColumns``)."""
    return select(*_tensors_table().c)


def _delete_content(session: Any, key: str) -> list[str]:
    """Delete a content's rows (its tensors, digests, files, and the referenced objects no other
    content reads); returns its files' keys."""
    shas = list(session.scalars(select(FileRef.sha256).where(FileRef.content_key == key)))
    session.execute(delete(TensorRow).where(TensorRow.content_key == key))
    session.execute(delete(ModuleDigestRow).where(ModuleDigestRow.content_key == key))
    session.execute(delete(FileRef).where(FileRef.content_key == key))
    session.execute(delete(Content).where(Content.key == key))
    still_used = select(FileRef.sha256).where(FileRef.sha256.in_(shas))
    session.execute(delete(SourceObject).where(SourceObject.key.in_(shas), SourceObject.key.not_in(still_used)))
    return shas


def source_location(url: str) -> str:
    """A referenced object's location for the readers and the stats: a local path for ``file://``
    URLs, the URL itself for an object store."""
    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme == "file" else url


def _page_query(
    stmt: Any,
    content: Content,
    root: str,
    *,
    prefix: str = "",
    search: str = "",
    kind: str | None = None,
    only_nonfinite: bool = False,
    sort: str = "position",
    descending: bool = False,
    offset: int = 0,
    limit: int = 100,
) -> tuple[Any, list[Any], int, int]:
    """A tensor list's select (``stmt`` filtered to a root's tensors that match), its order, offset
    and limit: names under ``prefix``, containing ``search`` (case-insensitive), of a ``kind``
    (parameter, buffer, alias), with NaN or Inf only, sorted by a ``SORTABLE`` column."""
    check_sort(sort)
    base = _root_filter(stmt, content, root, prefix)
    if search:
        base = base.where(func.lower(TensorRow.name).like("%" + _like_prefix(search.lower()), escape="\\"))
    if kind in ("parameter", "buffer"):
        base = base.where(TensorRow.kind == kind)
    elif kind == "alias":
        base = base.where(TensorRow.alias_of.is_not(None))
    if only_nonfinite:
        base = base.where((TensorRow.nan > 0) | (TensorRow.inf > 0))
    column = getattr(TensorRow, sort)
    order = [column.desc() if descending else column.asc(), TensorRow.position.asc()]
    if sort not in ("position", "name", "numel", "nbytes"):
        order.insert(0, column.is_(None))  # rows without stats last, either direction
    return base, order, offset, limit


def _root_filter(stmt: Any, content: Content, root: str, prefix: str = "") -> Any:
    stmt = stmt.where(TensorRow.content_key == content.key)
    full = (root + "." if root else "") + prefix
    if full:
        stmt = stmt.where(TensorRow.name.like(_like_prefix(full), escape="\\"))
    return stmt


def _tensor_rows(key: str, listing: Listing, sha_of_path: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "content_key": key,
            "position": i,
            "name": t.name,
            "dtype": t.dtype,
            "shape": dumps(list(t.shape)),
            "stride": dumps(list(t.stride)),
            "numel": t.numel,
            "nbytes": t.nbytes,
            "kind": t.kind,
            "alias_of": t.alias_of,
            "file_sha": sha_of_path[t.storage.path],
            "storage_key": t.storage.key,
            "storage_byte_offset": t.storage.offset,
            "storage_nbytes": t.storage.nbytes,
            "storage_offset": t.storage_offset,
            "kind_source": t.kind_source,
            "encoding": t.encoding,
            "file_dtype": t.file_dtype,
            "pieces": _pieces_to_json(t.pieces, sha_of_path) if t.pieces else None,
            "quant": dumps(quant_to_json(t.quant, partial(_part_to_json, sha_of_path))) if t.quant else None,
        }
        for i, t in enumerate(listing.tensors)
    ]


def _part_to_json(sha_of_path: dict[str, str], t: TensorInfo) -> list[Any]:
    """A part of a tensor row (a stitched tensor's chunk, a quantization's scales or zero points),
    naming its file by content hash (as tensor rows do)."""
    s = t.storage
    return [t.dtype, list(t.shape), list(t.stride), t.storage_offset, sha_of_path[s.path], s.offset, s.nbytes, s.key]


def _pieces_to_json(pieces: Sequence[Piece], sha_of_path: dict[str, str]) -> str:
    """A stitched tensor's chunks: each its offsets in the whole tensor, then the chunk."""
    return dumps([[list(p.offsets), *_part_to_json(sha_of_path, p.info)] for p in pieces])
