"""What a server may read: local paths only under the configured roots (as written AND after
resolving symlinks), buckets only from the allowlist. Nothing about a source URL can widen it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckptscope.errors import Forbidden

from .sources_refs import SourceRef, check_bucket_name, parse_source_url

ROOTS_SETTING = "CKPTSCOPE_SOURCE_ROOTS"
BUCKETS_SETTING = "CKPTSCOPE_SOURCE_BUCKETS"


def _refused(message: str) -> Forbidden:
    return Forbidden(message, "source_not_allowed")


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


class SourcePolicy:
    """``roots``: local folders (each also accepted as its symlink-resolved form); ``buckets``:
    bucket names, or ``bucket/prefix`` to allow only keys under that prefix."""

    def __init__(self, roots: Sequence[Path], buckets: Sequence[str]) -> None:
        self._roots: list[tuple[str, str]] = []  # (as configured, normalised; resolved)
        for root in roots:
            written = os.path.normpath(os.path.abspath(os.path.expanduser(str(root))))
            self._roots.append((written, os.path.realpath(written)))
        self._buckets: dict[str, list[str]] = {}  # bucket -> allowed key prefixes ("" = all)
        for entry in buckets:
            bucket, _, prefix = entry.strip().strip("/").partition("/")
            check_bucket_name(bucket)
            self._buckets.setdefault(bucket, []).append(prefix.strip("/"))

    def check(self, url: str) -> SourceRef:
        """Parse ``url`` and confine it (see ``confine``)."""
        return self.confine(parse_source_url(url))

    def confine(self, ref: SourceRef) -> SourceRef:
        """``ref`` if the configuration allows it (a file ref comes back with its symlinks
        resolved), else Forbidden (code ``source_not_allowed``). Use it again on every derived
        ref (a shard named by an index, a file found in a folder). A refusal names the setting
        but neither the configured values nor the path (nor where a link leads)."""
        if ref.scheme == "file":
            return self._confine_path(ref)
        return self._confine_object(ref)

    def _confine_path(self, ref: SourceRef) -> SourceRef:
        if not self._roots:
            raise _refused(f"local file sources are not enabled on this server ({ROOTS_SETTING} is empty)")
        written = os.path.normpath(ref.key)
        resolved = os.path.realpath(written)
        inside_as_written = False
        for root, real_root in self._roots:
            if _under(written, root) or _under(written, real_root):
                inside_as_written = True
                if _under(resolved, real_root):
                    return SourceRef("file", "", resolved)
        if inside_as_written:
            raise _refused(f"that path leads through a symbolic link out of the folders {ROOTS_SETTING} allows")
        raise _refused(f"that path is outside the folders {ROOTS_SETTING} allows")

    def _confine_object(self, ref: SourceRef) -> SourceRef:
        if not self._buckets:
            raise _refused(f"S3 sources are not enabled on this server ({BUCKETS_SETTING} is empty)")
        prefixes = self._buckets.get(ref.bucket)
        if prefixes is None:
            raise _refused(f"bucket {ref.bucket!r} is not one that {BUCKETS_SETTING} allows")
        if not any(not p or ref.key == p or ref.key.startswith(p + "/") for p in prefixes):
            raise _refused(f"{ref.url} is outside the prefixes {BUCKETS_SETTING} allows in bucket {ref.bucket!r}")
        return ref
