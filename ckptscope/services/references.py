"""Checkpoints opened where they live (issue 17): register a ``file://`` or ``s3://`` source by
reference, without copying it, and notice when it changes.

A referenced checkpoint's content is keyed by what its store says about each object it is read from
(ETag, version id, size, mtime: ``ObjectIdentity``) and by a digest of its listing (everything read
from its headers), so the same unchanged source registers as the same content, and a changed one
as another. Each view of such a checkpoint re-reads the identities (at most every
``CKPTSCOPE_SOURCE_RECHECK_S``); when one changed, the source is listed again, the checkpoint moves
to the new content, and its stats are computed afresh: the stats of the old bytes are never shown
as the current ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope.errors import CheckpointError, SourceChanged, SourceError, SourceNotFound
from ckptscope.formats.model import Checkpoint as Listing
from ckptscope.formats.model import checkpoint_to_json
from ckptscope.formats.ranged import open_ranged_checkpoint
from ckptscope.formats.sandbox import Limits, open_checkpoint_sandboxed
from ckptscope.store.catalogue import Checkpoint, Content, StatsState
from ckptscope.store.queries import SourceRecord, StoredFile, source_location
from ckptscope.store.source_reader import SourceRangeReader, changed_objects, content_objects
from ckptscope.store.sources import ObjectIdentity, SourceClient, SourcePolicy, SourceRef, parse_source_url
from ckptscope.text import make_storable

from .checkpoints import checkpoint_label, discard_unreferenced, forget_content

if TYPE_CHECKING:
    from ckptscope.core import Core

ORIGIN = "reference"


class BucketObjects:
    """The ``RemoteObjects`` the ranged readers list from: one bucket's objects through the source
    client, each object's identity taken at its first look and every read made conditional on it
    (an object that changes while it is listed fails the listing with ``source_changed``)."""

    def __init__(self, client: SourceClient, policy: SourcePolicy | None) -> None:
        self.client = client
        self.policy = policy
        self.identities: dict[str, ObjectIdentity] = {}
        self.refs: dict[str, SourceRef] = {}

    def ref(self, url: str) -> SourceRef:
        ref = self.refs.get(url)
        if ref is None:
            ref = parse_source_url(url)
            if self.policy is not None:
                ref = self.policy.confine(ref)
            self.refs[url] = ref
        return ref

    def stat(self, url: str) -> int | None:
        try:
            identity = self.identities.get(url) or self.client.head(self.ref(url))
        except SourceNotFound:
            return None
        self.identities[url] = identity
        return identity.size

    def read(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if url not in self.identities:
            self.stat(url)
        return self.client.read_ranges(self.ref(url), ranges, self.identities.get(url))

    def listdir(self, url: str) -> dict[str, int] | None:
        listed = self.client.list_dir(self.ref(url))
        if listed is None:
            return None
        base = url.rstrip("/")
        for name, identity in listed.items():
            self.identities.setdefault(f"{base}/{name}", identity)
        return {name: identity.size for name, identity in listed.items()}


@dataclass(frozen=True, slots=True)
class SourceListing:
    """A source listed: the checkpoint's listing, and each object it is read from."""

    ref: SourceRef
    listing: Listing
    objects: dict[str, tuple[SourceRef, ObjectIdentity]]  # listing path (a local path or a URL) -> object

    @property
    def content_key(self) -> str:
        described = {
            "sources": sorted([ref.url, identity.to_json()] for ref, identity in self.objects.values()),
            "listing": hashlib.sha256(
                json.dumps(checkpoint_to_json(self.listing), sort_keys=True).encode()
            ).hexdigest(),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def records(self) -> tuple[list[StoredFile], list[SourceRecord], dict[str, str]]:
        """The content's file rows, its source objects, and the file key of each listing path."""
        files: list[StoredFile] = []
        sources: list[SourceRecord] = []
        key_of_path: dict[str, str] = {}
        for path, (ref, identity) in sorted(self.objects.items()):
            key = object_key(ref, identity)
            files.append(StoredFile(_relative_name(self.ref, ref), key, identity.size))
            sources.append(SourceRecord(key, ref.url, identity.size, identity.to_json()))
            key_of_path[path] = key
        return files, sources, key_of_path


def object_key(ref: SourceRef, identity: ObjectIdentity) -> str:
    """The file key of one object as its store described it (a source_objects row)."""
    return hashlib.sha256(json.dumps([ref.url, identity.to_json()], sort_keys=True).encode()).hexdigest()


def _relative_name(top: SourceRef, ref: SourceRef) -> str:
    """An object's name within the checkpoint: its path below the registered folder, else its name."""
    base = top.key.rstrip("/") + "/"
    return ref.key[len(base) :] if ref.key.startswith(base) else ref.name


def list_source(core: Core, ref: SourceRef) -> SourceListing:
    """List a source where it lives, in the parse sandbox: a local file or folder read in place, an
    object store's headers read by byte range. The objects' identities are read before the listing
    and checked after it, so a source that changes meanwhile is refused, not half listed."""
    client = core.sources
    if ref.scheme == "file":
        listing = _list_local(core, ref)
        objects: dict[str, tuple[SourceRef, ObjectIdentity]] = {}
        for path in listing.files:
            file_ref = core.source_policy.confine(parse_source_url(Path(path).as_uri()))
            objects[path] = (file_ref, client.head(file_ref))
        return SourceListing(ref, listing, objects)
    remote = BucketObjects(client, core.source_policy)
    with core.parse_slots:
        listing, _report = open_ranged_checkpoint(ref.url, remote, name=ref.name or None, limits=core.parse_limits)
    make_storable(listing)
    objects = {}
    for url in listing.files:
        identity = remote.identities.get(url)
        if identity is None:
            raise CheckpointError("unreadable", f"the listing names an object it did not read: {url}")
        objects[url] = (remote.ref(url), identity)
    return SourceListing(ref, listing, objects)


def open_remote(url: str, limits: Limits) -> tuple[Listing, SourceRangeReader]:
    """The CLI's way in: list an ``s3://`` source by its header ranges (in the parse sandbox) with
    the AWS environment's credentials, and the reader its stats read the tensors' ranges with. No
    source policy applies: the CLI reads what its user's credentials can."""
    client = SourceClient()
    remote = BucketObjects(client, None)
    listing, _report = open_ranged_checkpoint(url, remote, name=parse_source_url(url).name or None, limits=limits)
    make_storable(listing)
    used = [(remote.ref(u), remote.identities[u]) for u in listing.files if u in remote.identities]
    return listing, SourceRangeReader(client, used)


def _list_local(core: Core, ref: SourceRef) -> Listing:
    path = Path(ref.key)
    shards = None
    if not path.is_dir():
        core.sources.head(ref)  # a clear 404 for a file that is not there
    if path.is_file():
        # an index's shards (or a .metadata's .distcp files): only the files beside it that stay in
        # the configured root, never a link out of it
        beside = core.sources.list_dir(ref.parent) or {}
        shards = {name: Path(core.source_policy.confine(ref.parent.child(name)).key) for name in beside}
    with core.parse_slots:
        listing = open_checkpoint_sandboxed(
            path, limits=core.parse_limits, shards=shards, name=ref.name or None, folder=False
        )
    make_storable(listing)
    return listing


def register_reference(
    core: Core, source: str, name: str | None = None, idempotency: tuple[str, str] | None = None
) -> Checkpoint:
    """Register the checkpoint at ``source`` (a URL the source policy allows) without copying it.
    The same unchanged source registered twice shares one listing and one set of stats."""
    ref = core.source_policy.check(source)
    try:
        listed = list_source(core, ref)
    except CheckpointError as exc:
        core.metrics.inc("ckptscope_parse_failures_total", code=exc.code)
        raise
    _check_unchanged(core.sources, listed)
    label = checkpoint_label(name) if name else _default_name(ref)
    row, content = _store(core, listed, name=label, idempotency=idempotency)
    if content.stats_state in (StatsState.PENDING, StatsState.FAILED):
        core.jobs.submit_stats(content.key)
    core.metrics.inc("ckptscope_references_total")
    return row


def _default_name(ref: SourceRef) -> str:
    return (ref.name or ref.bucket or "source")[:200]


def _provenance(ref: SourceRef, **extra: Any) -> dict[str, Any]:
    return {"source": ref.url, "scheme": ref.scheme, **extra}


def _store(
    core: Core,
    listed: SourceListing,
    *,
    name: str,
    checkpoint: bool = True,
    provenance: dict[str, Any] | None = None,
    idempotency: tuple[str, str] | None = None,
) -> tuple[Checkpoint, Content]:
    files, sources, key_of_path = listed.records()
    return core.queries.register(
        listed.content_key,
        listed.listing,
        files,
        key_of_path,
        name=name,
        origin=ORIGIN,
        provenance=provenance or _provenance(listed.ref),
        sources=sources,
        checkpoint=checkpoint,
        idempotency=idempotency,
    )


def _check_unchanged(client: SourceClient, listed: SourceListing) -> None:
    changed = [ref.url for ref, identity in listed.objects.values() if not client.head(ref).same_object(identity)]
    if changed:
        raise SourceChanged(f"the source changed while it was listed ({changed[0]}); try again")


# --- noticing a changed source -----------------------------------------------------------------


def refresh_reference(core: Core, row: Checkpoint, content: Content) -> tuple[Checkpoint, Content]:
    """A referenced checkpoint as its source is now: unchanged, it is returned as it is; changed, it
    is listed again and moved to the new content (its stats computed afresh) with ``changed_at`` in
    its provenance; gone, it keeps its last listing with ``missing_at`` set, for the faces to say
    so. Uploads, copies and exports are returned as they are."""
    if row.origin != ORIGIN:
        return row, content
    now = time.monotonic()
    last = core.source_checks.get(row.id)
    if last is not None and now - last < core.settings.source_recheck_s:
        return row, content
    objects = content_objects(core.queries, content.key)
    changed = changed_objects(core.sources, objects)
    core.source_checks[row.id] = now
    provenance = dict(row.provenance or {})
    if not changed:
        if provenance.pop("missing_at", None) is not None:
            core.queries.repoint_checkpoint(row.id, content.key, provenance)
            return core.queries.get_checkpoint(row.id)
        return row, content
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    ref = parse_source_url(str(provenance.get("source") or objects[0][0].url))
    try:
        for url in changed:  # an object that is gone: nothing to list again
            core.sources.head(parse_source_url(url))
        listed = list_source(core, core.source_policy.confine(ref))
        _check_unchanged(core.sources, listed)
    except (SourceError, CheckpointError) as exc:
        # gone, unreadable now, or not allowed any more: keep the last listing, and say why
        provenance.update(missing_at=stamp, missing_reason=str(exc)[:300])
        core.queries.repoint_checkpoint(row.id, content.key, provenance)
        return core.queries.get_checkpoint(row.id)
    provenance.pop("missing_at", None)
    provenance.pop("missing_reason", None)
    provenance.update(changed_at=stamp, changed_objects=changed[:20])
    _, new_content = _store(core, listed, name=row.name, checkpoint=False, provenance=provenance)
    left = core.queries.repoint_checkpoint(row.id, new_content.key, provenance)
    if left is not None:
        _drop_if_unused(core, left)
    if new_content.stats_state in (StatsState.PENDING, StatsState.FAILED):
        core.jobs.submit_stats(new_content.key)
    return core.queries.get_checkpoint(row.id)


def _drop_if_unused(core: Core, content_key: str) -> None:
    discard_unreferenced(core, core.queries.drop_content_if_unused(content_key, partial(forget_content, core)))


def source_of(row: Checkpoint) -> dict[str, Any] | None:
    """What the faces show of a referenced checkpoint's source: its URL, and whether (and when) it
    changed or went missing; None for uploads, copies and exports."""
    if row.origin != ORIGIN or not row.provenance:
        return None
    p = row.provenance
    return {
        "url": p.get("source"),
        "changed_at": p.get("changed_at"),
        "missing_at": p.get("missing_at"),
        "missing_reason": p.get("missing_reason"),
    }


__all__ = [
    "BucketObjects",
    "SourceListing",
    "list_source",
    "open_remote",
    "object_key",
    "refresh_reference",
    "register_reference",
    "source_location",
    "source_of",
]
