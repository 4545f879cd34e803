"""Catalogue use cases: ingest uploaded blobs, list, read tensors/tree/stats, delete."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update

from app.formats import Checkpoint as Listing
from app.formats import StorageRef, TensorInfo
from app.formats.sandbox import Limits, open_checkpoint_sandboxed
from app.stats import TensorStats, TreeNode, build_tree
from app.store.blobs import Blob
from app.store.catalogue import Checkpoint, Content, FileRef, TensorRow, dumps, retry_conflicts

from .errors import Invalid, NotFound

if TYPE_CHECKING:
    from .core import Core

SORTABLE = ("position", "name", "numel", "nbytes", "mean", "std", "min", "max", "l2", "absmax", "zeros", "nan", "inf")


@dataclass(frozen=True, slots=True)
class Upload:
    name: str  # the client's file name: display text and shard name only, never a path
    blob: Blob


def display_name(raw: str | None) -> str:
    """A client-supplied name made safe to show: last path part, no control characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name.strip()[:255] or "upload"


def _content_key(uploads: Sequence[Upload]) -> str:
    if len(uploads) == 1:
        return uploads[0].blob.sha256
    parts = sorted((display_name(u.name), u.blob.sha256) for u in uploads)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _pick_primary(uploads: Sequence[Upload]) -> Upload:
    if len(uploads) == 1:
        return uploads[0]
    from app.formats import sniff

    indexes = [u for u in uploads if sniff(u.blob.path) == "json"]
    if len(indexes) != 1:
        raise Invalid("several files were uploaded: a sharded set needs exactly one *.index.json beside its shards")
    return indexes[0]


def _check_storable(listing: Listing) -> None:
    """Text the catalogue must be able to hold on any database (PostgreSQL refuses NUL)."""
    for t in listing.tensors:
        if "\x00" in t.name:
            raise Invalid(
                f"tensor name {t.name[:80]!r} contains a NUL character, which the catalogue cannot store", "bad_name"
            )
    listing.metadata = _strip_nul(listing.metadata)


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\x00")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def _blob_referenced(core: Core, sha: str) -> bool:
    with core.catalogue.session() as session:  # a fresh transaction: sees what others committed
        return session.scalar(select(func.count()).select_from(FileRef).where(FileRef.sha256 == sha)) > 0


def discard_unreferenced(core: Core, shas: Sequence[str]) -> None:
    """Delete the blobs that no catalogue row references and no upload in flight has pinned."""
    for sha in sorted(set(shas)):
        core.blobs.delete_unless(sha, lambda sha=sha: _blob_referenced(core, sha))


def release_blobs(core: Core, blobs: Sequence[Blob]) -> None:
    """An upload is done with its blobs (registered or refused): unpin them, delete the unused."""
    for blob in blobs:
        core.blobs.unpin(blob)
    discard_unreferenced(core, [b.sha256 for b in blobs])


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
        }
        for i, t in enumerate(listing.tensors)
    ]


def ingest(
    core: Core,
    uploads: Sequence[Upload],
    name: str | None = None,
    origin: str = "upload",
    provenance: dict[str, Any] | None = None,
) -> Checkpoint:
    """Register uploaded blobs as a checkpoint. On any refusal the blobs that nothing else uses are
    removed, so a failed upload leaves no file and no catalogue row behind. Either way the
    upload's pins on its blobs are released."""
    try:
        if not uploads:
            raise Invalid("no file was uploaded (send the checkpoint in the multipart field 'file')")
        primary = _pick_primary(uploads)
        by_name = {display_name(u.name): u.blob.path for u in uploads}
        if len(by_name) != len(uploads):
            raise Invalid("two uploaded files have the same name")
        settings = core.settings
        limits = Limits(settings.parse_memory_bytes, settings.parse_cpu_seconds, settings.parse_timeout_s)
        # shard names resolve only among the files of this upload, never next to the blob (that
        # directory holds other uploads' blobs)
        listing = open_checkpoint_sandboxed(
            primary.blob.path, shards=by_name, name=display_name(primary.name), limits=limits
        )
        _check_storable(listing)
        used = {str(p) for p in listing.files}
        unused = [display_name(u.name) for u in uploads if str(u.blob.path) not in used]
        if unused:
            raise Invalid(f"uploaded files not named by the index: {', '.join(sorted(unused))[:300]}")
        return _register(core, uploads, primary, listing, name, origin, provenance)
    finally:
        release_blobs(core, [u.blob for u in uploads])


def _register(
    core: Core,
    uploads: Sequence[Upload],
    primary: Upload,
    listing: Listing,
    name: str | None,
    origin: str,
    provenance: dict[str, Any] | None,
) -> Checkpoint:
    key = _content_key(uploads)
    sha_of_path = {str(u.blob.path): u.blob.sha256 for u in uploads}

    def register() -> tuple[Checkpoint, Content]:
        with core.catalogue.session() as session, session.begin():
            content = session.get(Content, key)
            if content is None:
                tree = build_tree(listing.tensors)
                content = Content(
                    key=key,
                    format=listing.format,
                    default_root=listing.default_root,
                    roots=[{"path": r.path, "tensor_count": r.tensor_count} for r in listing.roots],
                    meta=listing.metadata,
                    warnings=listing.warnings,
                    tensor_count=len(listing.tensors),
                    total_bytes=tree.nbytes,
                    stats_state="pending",
                )
                session.add(content)
                session.flush()
                session.add_all(
                    FileRef(content_key=key, name=display_name(u.name), sha256=u.blob.sha256, size=u.blob.size)
                    for u in uploads
                )
                session.execute(TensorRow.__table__.insert(), _tensor_rows(key, listing, sha_of_path))
            row = Checkpoint(
                name=display_name(name or primary.name),
                content_key=key,
                size_bytes=sum(u.blob.size for u in uploads),
                origin=origin,
                provenance=provenance,
            )
            session.add(row)
        return row, content

    # another process may register the same content at the same moment (the loser's insert
    # conflicts) or delete it (the checkpoint's reference fails): then look again
    row, content = retry_conflicts(register)
    if content.stats_state in ("pending", "failed"):
        core.jobs.submit_stats(key)
    if origin == "upload":
        core.metrics.inc("ckptscope_uploads_total")
        core.metrics.inc("ckptscope_upload_bytes_total", row.size_bytes)
    return row


def get_checkpoint(core: Core, checkpoint_id: str) -> tuple[Checkpoint, Content]:
    with core.catalogue.session() as session:
        row = session.get(Checkpoint, checkpoint_id)
        if row is None:
            raise NotFound(f"no checkpoint with id {checkpoint_id!r}")
        content = session.get(Content, row.content_key)
        assert content is not None
        return row, content


def list_checkpoints(core: Core) -> list[tuple[Checkpoint, Content]]:
    with core.catalogue.session() as session:
        rows = session.execute(
            select(Checkpoint, Content)
            .join(Content, Checkpoint.content_key == Content.key)
            .order_by(Checkpoint.created_at.desc())
        )
        return [(c, k) for c, k in rows]


def files_of(core: Core, content_key: str) -> list[FileRef]:
    with core.catalogue.session() as session:
        return list(session.scalars(select(FileRef).where(FileRef.content_key == content_key).order_by(FileRef.name)))


def delete_checkpoint(core: Core, checkpoint_id: str) -> None:
    def delete_rows() -> list[str]:
        with core.catalogue.session() as session, session.begin():
            row = session.get(Checkpoint, checkpoint_id)
            if row is None:
                raise NotFound(f"no checkpoint with id {checkpoint_id!r}")
            key = row.content_key
            session.delete(row)
            session.flush()
            others = session.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.content_key == key))
            if others:
                return []
            core.jobs.cancel(key)  # this process's job; others notice the content is gone
            shas = list(session.scalars(select(FileRef.sha256).where(FileRef.content_key == key)))
            session.execute(delete(TensorRow).where(TensorRow.content_key == key))
            session.execute(delete(FileRef).where(FileRef.content_key == key))
            session.execute(delete(Content).where(Content.key == key))
            return shas

    # a concurrent upload of the same content may add a checkpoint meanwhile: then keep the content
    discard_unreferenced(core, retry_conflicts(delete_rows))


# --- reading tensors -------------------------------------------------------------------------


def check_root(content: Content, root: str | None) -> str:
    root = content.default_root if root is None else root
    if root != "" and root not in {r["path"] for r in content.roots}:
        known = ", ".join(repr(r["path"]) for r in content.roots)
        raise NotFound(f"no root {root!r} in this checkpoint (roots: {known})")
    return root


def _like_prefix(prefix: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


def _root_filter(stmt: Any, content: Content, root: str, prefix: str = "") -> Any:
    stmt = stmt.where(TensorRow.content_key == content.key)
    full = (root + "." if root else "") + prefix
    if full:
        stmt = stmt.where(TensorRow.name.like(_like_prefix(full), escape="\\"))
    return stmt


def row_to_info(core: Core, row: TensorRow, cut: int = 0) -> TensorInfo:
    storage = StorageRef(
        str(core.blobs.path_for(row.file_sha)), row.storage_byte_offset, row.storage_nbytes, row.storage_key
    )
    alias = row.alias_of[cut:] if row.alias_of and cut and len(row.alias_of) > cut else row.alias_of
    return TensorInfo(
        row.name[cut:],
        row.dtype,
        tuple(json.loads(row.shape)),
        tuple(json.loads(row.stride)),
        row.storage_offset,
        storage,
        row.kind,
        alias,
    )


def row_to_stats(row: TensorRow) -> TensorStats | None:
    if row.hist is None:
        return None
    hist = json.loads(row.hist)
    return TensorStats(
        numel=row.numel,
        mean=row.mean,
        std=row.std,
        min=row.min,
        max=row.max,
        l2=row.l2,
        absmax=row.absmax,
        zeros=row.zeros or 0,
        nan=row.nan or 0,
        inf=row.inf or 0,
        hist=hist["bins"],
        hist_min=hist["min"],
        hist_max=hist["max"],
        note=hist.get("note"),
    )


@dataclass(slots=True)
class TensorPage:
    total: int
    rows: list[tuple[TensorInfo, TensorStats | None]]


def tensor_page(
    core: Core,
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
) -> TensorPage:
    if sort not in SORTABLE:
        raise Invalid(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)}")
    cut = len(root) + 1 if root else 0
    base = _root_filter(select(TensorRow), content, root, prefix)
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
    with core.catalogue.session() as session:
        total = session.scalar(select(func.count()).select_from(base.subquery()))
        rows = session.scalars(base.order_by(*order).offset(offset).limit(limit)).all()
    return TensorPage(total or 0, [(row_to_info(core, r, cut), row_to_stats(r)) for r in rows])


def tensor_detail(core: Core, content: Content, root: str, name: str) -> tuple[TensorInfo, TensorStats | None]:
    full = f"{root}.{name}" if root else name
    with core.catalogue.session() as session:
        row = session.scalars(
            select(TensorRow).where(TensorRow.content_key == content.key, TensorRow.name == full).limit(1)
        ).first()
    if row is None:
        raise NotFound(f"no tensor named {name!r} under root {root!r}")
    return row_to_info(core, row, len(root) + 1 if root else 0), row_to_stats(row)


def all_tensors(core: Core, content: Content, root: str = "") -> list[tuple[TensorInfo, TensorStats | None]]:
    cut = len(root) + 1 if root else 0
    with core.catalogue.session() as session:
        rows = session.scalars(_root_filter(select(TensorRow), content, root).order_by(TensorRow.position)).all()
    return [(row_to_info(core, r, cut), row_to_stats(r)) for r in rows]


_TREE_CACHE: dict[tuple[str, str, str], TreeNode] = {}


def module_tree(core: Core, content: Content, root: str) -> TreeNode:
    """The module tree of a root, built once per (content, root, stats state)."""
    cache_key = (content.key, root, content.stats_state)
    tree = _TREE_CACHE.get(cache_key)
    if tree is None:
        pairs = all_tensors(core, content, root)
        tree = build_tree([t for t, _ in pairs], {t.name: s for t, s in pairs if s is not None})
        if len(_TREE_CACHE) > 32:
            _TREE_CACHE.pop(next(iter(_TREE_CACHE)))
        _TREE_CACHE[cache_key] = tree
    return tree


def module_node(core: Core, content: Content, root: str, path: str) -> TreeNode:
    node = module_tree(core, content, root).find(path)
    if node is None:
        raise NotFound(f"no module {path!r} in this checkpoint")
    return node


def save_stats(core: Core, content_key: str, stats_by_position: dict[int, TensorStats]) -> int:
    """Write computed stats; returns how many rows were updated (0 when the content is gone)."""
    from sqlalchemy import bindparam

    params = []
    for position, s in stats_by_position.items():
        j = s.to_json()
        params.append(
            {
                "k": content_key,
                "p": position,
                "mean": j["mean"],
                "std": j["std"],
                "min": j["min"],
                "max": j["max"],
                "l2": j["l2"],
                "absmax": j["absmax"],
                "zeros": s.zeros,
                "nan": s.nan,
                "inf": s.inf,
                "hist": dumps({"bins": s.hist, "min": j["hist_min"], "max": j["hist_max"], "note": s.note}),
            }
        )
    stmt = (
        update(TensorRow.__table__)
        .where(TensorRow.__table__.c.content_key == bindparam("k"), TensorRow.__table__.c.position == bindparam("p"))
        .values(
            mean=bindparam("mean"),
            std=bindparam("std"),
            min=bindparam("min"),
            max=bindparam("max"),
            l2=bindparam("l2"),
            absmax=bindparam("absmax"),
            zeros=bindparam("zeros"),
            nan=bindparam("nan"),
            inf=bindparam("inf"),
            hist=bindparam("hist"),
        )
    )
    with core.catalogue.engine.begin() as conn:
        if not params:
            return 0
        result = conn.execute(stmt, params)
        return result.rowcount
