"""Where a content's tensor bytes come from, for the stats: uploaded blobs and referenced local files
are mmapped where they are; referenced objects in a bucket are read by byte range, each read
conditional on the identity the object was listed with (``stats.spool.RangeReader``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from ckptscope.errors import SourceChanged, SourceNotFound

from .queries import CatalogueQueries
from .sources import ObjectIdentity, SourceClient, SourceRef, parse_source_url


class SourceRangeReader:
    """A picklable ``RangeReader``: ``objects`` maps each remote location (a URL, as the content's
    tensors name it) to its object and listed identity; every other path is a local file."""

    def __init__(self, client: SourceClient, objects: Iterable[tuple[SourceRef, ObjectIdentity]]) -> None:
        self.client = client
        listed = list(objects)
        self.referenced = bool(listed)  # a checkpoint opened where it lives (not an upload's blobs)
        self.objects = {ref.url: (ref, identity) for ref, identity in listed if client.local_path(ref) is None}

    @property
    def remote(self) -> bool:
        """Whether any tensor byte must be read from an object store."""
        return bool(self.objects)

    def local_path(self, path: str) -> str | None:
        return None if path in self.objects else path

    def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
        ref, identity = self.objects[path]
        return self.client.copy_range(ref, start, end, out, identity)


HEAD_THREADS = 16  # identities of a sharded set's objects are read this many at a time


def content_objects(queries: CatalogueQueries, content_key: str) -> list[tuple[SourceRef, ObjectIdentity]]:
    """A content's referenced objects as they were listed (none for an upload)."""
    return [
        (parse_source_url(o.url), ObjectIdentity.from_json(o.identity)) for o in queries.source_objects(content_key)
    ]


def changed_objects(client: SourceClient, objects: Sequence[tuple[SourceRef, ObjectIdentity]]) -> list[str]:
    """The URLs of the objects whose store now describes them otherwise, or that are gone."""

    def changed(item: tuple[SourceRef, ObjectIdentity]) -> str | None:
        ref, identity = item
        try:
            return None if client.head(ref).same_object(identity) else ref.url
        except SourceNotFound:
            return ref.url

    if len(objects) <= 1:
        found = [changed(o) for o in objects]
    else:
        with ThreadPoolExecutor(max_workers=min(HEAD_THREADS, len(objects))) as pool:
            found = list(pool.map(changed, objects))
    return [url for url in found if url is not None]


def verify_unchanged(client: SourceClient, queries: CatalogueQueries, content_key: str) -> None:
    """Raise ``SourceChanged`` when an object the content was listed from changed since (a stats
    job checks this before it saves what it read)."""
    changed = changed_objects(client, content_objects(queries, content_key))
    if changed:
        raise SourceChanged(f"the source changed while its stats were computed ({changed[0]})")
