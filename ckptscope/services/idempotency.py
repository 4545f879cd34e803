"""Upload retries: an upload sent with an ``Idempotency-Key`` registers one checkpoint however often
it is retried. The key is recorded with the checkpoint its first request made, beside a fingerprint
of that request (the uploaded files' names and sha256, and the name given); a retry with the same
fingerprint returns that checkpoint without parsing the files again, the same key with another
fingerprint is refused (``idempotency-key-reused``, 422). The catalogue's primary key on the key
settles requests racing in several server processes (``CatalogueQueries.register``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckptscope.store.catalogue import Checkpoint
from ckptscope.store.queries import KeyTaken

from .checkpoints import Upload, ingest, named_blobs, release_blobs
from .references import register_reference

if TYPE_CHECKING:
    from ckptscope.core import Core


def upload_fingerprint(uploads: Sequence[Upload], name: str | None) -> str:
    """What makes two upload requests the same: their files (name and content hash, in any order)
    and the name they give the checkpoint."""
    return hashlib.sha256(json.dumps([named_blobs(uploads), name or ""]).encode()).hexdigest()


def ingest_once(core: Core, uploads: Sequence[Upload], key: str, name: str | None = None) -> tuple[Checkpoint, bool]:
    """``ingest`` under an idempotency key: (the checkpoint, whether an earlier request with this
    key made it)."""
    fingerprint = upload_fingerprint(uploads, name)
    try:
        earlier = core.queries.checkpoint_for_key(key, fingerprint)
    except BaseException:
        release_blobs(core, [u.blob for u in uploads])
        raise
    if earlier is not None:
        release_blobs(core, [u.blob for u in uploads])
        return earlier, True
    try:
        return ingest(core, uploads, name=name, idempotency=(key, fingerprint)), False
    except KeyTaken as taken:  # a request with this key, in flight meanwhile, registered first
        return core.queries.get_checkpoint(taken.checkpoint_id)[0], True


def register_once(core: Core, source: str, key: str, name: str | None = None) -> tuple[Checkpoint, bool]:
    """``register_reference`` under an idempotency key: the request is its source URL and name."""
    fingerprint = hashlib.sha256(json.dumps(["reference", source, name or ""]).encode()).hexdigest()
    earlier = core.queries.checkpoint_for_key(key, fingerprint)
    if earlier is not None:
        return earlier, True
    try:
        return register_reference(core, source, name, idempotency=(key, fingerprint)), False
    except KeyTaken as taken:
        return core.queries.get_checkpoint(taken.checkpoint_id)[0], True
