"""One client that reads referenced checkpoints from both kinds of store: local files (pread,
with size+mtime checked around each read) and S3-compatible buckets (obstore, ranged GETs made
conditional on the object's ETag or version, so a changed object raises SourceChanged).

Thread-safe, and picklable for Dask: only the configuration travels; each process makes its own
obstore stores, lazily, one per bucket. Timeouts and retries are short, so that a dead endpoint
fails in seconds rather than after obstore's default three minutes."""

from __future__ import annotations

import os
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from itertools import islice
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import obstore
from obstore.store import S3Store

from ckptscope.errors import SourceChanged, SourceError, SourceNotFound

from .sources_aws import S3Settings, s3_settings
from .sources_errors import s3_error
from .sources_local import (
    addressable,
    check_entry_count,
    clamp,
    copy_file_range,
    head_file,
    list_folder,
    read_file_ranges,
)
from .sources_refs import ObjectIdentity, SourceRef

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta

T = TypeVar("T")


def _meta_identity(meta: ObjectMeta) -> ObjectIdentity:
    return ObjectIdentity(
        size=int(meta["size"]),
        etag=meta.get("e_tag"),
        version=meta.get("version"),
        mtime=meta["last_modified"].timestamp(),
    )


class SourceClient:
    """Reads objects named by SourceRefs (already confined by a SourcePolicy).

    ``env`` (default: this process's environment, read now) gives the S3 endpoint, region and
    credentials (sources_aws.py); a pickled client carries what it resolved to, so a Dask worker
    reaches the same endpoint with the same keys. ``timeout_s`` bounds each request and its
    retries; ``coalesce_bytes``: ranges at most this far apart are fetched by one GET;
    ``parallel_requests``: GETs in flight at once for one call."""

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        connect_timeout_s: float = 3.0,
        coalesce_bytes: int = 1 << 20,
        parallel_requests: int = 8,
    ) -> None:
        self._s3 = s3_settings(os.environ if env is None else env)
        self._timeout_s = float(timeout_s)
        self._max_retries = int(max_retries)
        self._connect_timeout_s = min(float(connect_timeout_s), self._timeout_s)
        self._coalesce = int(coalesce_bytes)
        self._parallel = max(1, int(parallel_requests))
        self._start_process_state()

    # --- process-local state (never pickled) -------------------------------------------------

    def _start_process_state(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, S3Store] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._served = 0

    def __getstate__(self) -> dict[str, Any]:
        return {
            "s3": self._s3,
            "timeout_s": self._timeout_s,
            "max_retries": self._max_retries,
            "connect_timeout_s": self._connect_timeout_s,
            "coalesce": self._coalesce,
            "parallel": self._parallel,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._s3 = state["s3"]
        self._timeout_s = state["timeout_s"]
        self._max_retries = state["max_retries"]
        self._connect_timeout_s = state["connect_timeout_s"]
        self._coalesce = state["coalesce"]
        self._parallel = state["parallel"]
        self._start_process_state()

    @property
    def s3_settings(self) -> S3Settings:
        return self._s3

    def served_bytes(self) -> int:
        """Bytes this client has read from its stores so far (in this process)."""
        with self._lock:
            return self._served

    def _count(self, n: int) -> None:
        with self._lock:
            self._served += n

    def _store(self, bucket: str) -> S3Store:
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                retry_s = max(self._timeout_s, 1.0)
                store = S3Store(
                    bucket,
                    config=self._s3.store_config(),  # type: ignore[arg-type]
                    credential_provider=self._s3.credentials(),  # type: ignore[arg-type]
                    client_options={
                        "allow_http": self._s3.allow_http,
                        "timeout": timedelta(seconds=self._timeout_s),
                        "connect_timeout": timedelta(seconds=self._connect_timeout_s),
                    },
                    retry_config={
                        "max_retries": self._max_retries,
                        "retry_timeout": timedelta(seconds=retry_s),
                        "backoff": {
                            "init_backoff": timedelta(milliseconds=100),
                            "max_backoff": timedelta(seconds=2),
                            "base": 2,
                        },
                    },
                )
                self._stores[bucket] = store
            return store

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._parallel, thread_name_prefix="ckptscope-source")
            return self._pool

    def _s3_call(self, ref: SourceRef, call: Callable[[], T]) -> T:
        try:
            return call()
        except SourceError:
            raise
        except Exception as exc:  # obstore raises its own classes, FileNotFoundError and ValueError
            raise s3_error(exc, ref, self._s3.endpoint_host) from None

    # --- what the store says -----------------------------------------------------------------

    def head(self, ref: SourceRef) -> ObjectIdentity:
        """The object's identity; SourceNotFound when there is no such object (or it is a folder)."""
        if ref.scheme == "file":
            return head_file(ref)
        if not ref.key:
            raise SourceNotFound(f"{ref.url} is a bucket, not an object")
        meta = self._s3_call(ref, lambda: obstore.head(self._store(ref.bucket), ref.key))
        return _meta_identity(meta)

    def list_dir(self, ref: SourceRef) -> dict[str, ObjectIdentity] | None:
        """One level of a folder / prefix: plain file names -> identity (sub-folders left out),
        or None when ``ref`` is not a folder. Links that lead out of the folder are left out."""
        if ref.scheme == "file":
            return list_folder(ref)
        listing = self._s3_call(ref, lambda: obstore.list_with_delimiter(self._store(ref.bucket), ref.key or None))
        objects = listing["objects"]
        if ref.key and not objects and not listing["common_prefixes"]:
            return None
        cut = len(ref.key) + 1 if ref.key else 0
        found: dict[str, ObjectIdentity] = {}
        for meta in objects:
            name = meta["path"][cut:]
            if addressable(name):  # a "folder/" marker object has no name of its own
                found[name] = _meta_identity(meta)
                check_entry_count(ref, len(found))
        return found

    def local_path(self, ref: SourceRef) -> str | None:
        """The local path of a file ref (stats mmap it directly); None for S3."""
        return ref.key if ref.scheme == "file" else None

    # --- bytes ----------------------------------------------------------------------------------

    def read_ranges(
        self, ref: SourceRef, ranges: Sequence[tuple[int, int]], identity: ObjectIdentity | None = None
    ) -> list[bytes]:
        """The bytes of each ``[start, end)`` (clamped to the object), all from one version of it:
        SourceChanged when it differs from ``identity`` (or changes while being read)."""
        if ref.scheme == "file":
            return read_file_ranges(ref, ranges, identity, self._count)
        identity = identity or self.head(ref)
        clamped = [clamp(s, e, identity.size) for s, e in ranges]
        spans = _coalesce(sorted({r for r in clamped if r[1] > r[0]}), self._coalesce)
        if not spans:
            return [b"" for _ in clamped]
        if len(spans) == 1:
            got = [self._get(ref, spans[0], identity)]
        else:
            pool = self._executor()
            futures = [pool.submit(self._get, ref, span, identity) for span in spans]
            got = [f.result() for f in futures]
        span_starts = [s for s, _ in spans]
        out = []
        for start, end in clamped:
            if start == end:
                out.append(b"")
                continue
            i = bisect_right(span_starts, start) - 1  # the span that holds [start, end)
            out.append(got[i][start - span_starts[i] : end - span_starts[i]])
        return out

    def _get(self, ref: SourceRef, span: tuple[int, int], identity: ObjectIdentity) -> bytes:
        """One ranged GET, conditional on the identity's ETag (and version id when it has one)."""
        options: GetOptions = {"range": span}
        if identity.etag:
            options["if_match"] = identity.etag
        if identity.version:
            options["version"] = identity.version

        def fetch() -> tuple[bytes, ObjectIdentity, tuple[int, int]]:
            result = obstore.get(self._store(ref.bucket), ref.key, options=options)
            data = bytes(result.bytes())
            return data, _meta_identity(result.meta), result.range

        data, seen, got_range = self._s3_call(ref, fetch)
        self._count(len(data))
        if not identity.same_object(seen) or tuple(got_range) != span or len(data) != span[1] - span[0]:
            raise SourceChanged(f"{ref.url} changed since it was listed (another size or modification time)")
        return data

    def copy_range(
        self,
        ref: SourceRef,
        start: int,
        end: int,
        out: BinaryIO,
        identity: ObjectIdentity | None = None,
        chunk: int = 8 << 20,
    ) -> int:
        """Stream ``[start, end)`` (clamped) into ``out`` in pieces of ``chunk`` bytes at most
        (S3: one ranged GET per piece, the next one fetched while this one is written); returns
        the bytes written. The same change checks as read_ranges."""
        chunk = max(1, int(chunk))
        if ref.scheme == "file":
            return copy_file_range(ref, start, end, out, identity, chunk, self._count)
        identity = identity or self.head(ref)
        start, end = clamp(start, end, identity.size)
        spans = [(s, min(s + chunk, end)) for s in range(start, end, chunk)]
        pool = self._executor()
        pending: deque[Future[bytes]] = deque()
        written = 0
        queued = iter(spans)
        try:
            for span in islice(queued, 2):  # one piece in flight while another is written
                pending.append(pool.submit(self._get, ref, span, identity))
            while pending:
                data = pending.popleft().result()
                out.write(data)
                written += len(data)
                nxt = next(queued, None)
                if nxt is not None:
                    pending.append(pool.submit(self._get, ref, nxt, identity))
        finally:
            for future in pending:
                future.cancel()
        return written


def _coalesce(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted, non-empty spans merged where they overlap or lie at most ``gap`` bytes apart."""
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
