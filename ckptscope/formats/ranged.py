"""List a checkpoint that lives in an object store by reading only its header byte ranges.

The caller passes the store in as ``RemoteObjects`` (formats never imports the store and does no
network I/O itself). Listing runs in rounds: each round runs the normal ``open_checkpoint`` over
``RangedPath``s (``ranged_path.py``) whose bytes come from a cache of the ranges fetched so far.
A round that met no uncached byte is final: its checkpoint (or its CheckpointError) is the
answer. A round that did is thrown away (it may have read zeros), everything it missed is
fetched at once (one ``read`` per object, in parallel) and the next round runs. Everything a
round read before its first miss was real, so each round gets further; the fetched bytes and the
rounds are both bounded.

Round 1 starts from the object's first and last 64 KiB (a safetensors header, a zip's end records
and central directory, a GGUF header, a pickle's start). Readers tell ranged files, before a loop,
what the loop will read (``ranged_path.will_read``: every local header of a zip, every storage
length of a legacy file, both ends of every DCP item, every shard of an index), so a torch zip
takes 2 rounds (3 when its central directory is not in the last 64 KiB) and a sharded set of any
size 2-3.

With ``limits`` each round runs in the sandboxed child (``sandbox.py``), which gets the cache as
read-only files (``ranged_sandbox.py``) and answers its misses and the ranges it read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

from ckptscope.errors import CheckpointError, SourceChanged, SourceNotFound

from . import open_checkpoint
from .model import Checkpoint, checkpoint_from_json, checkpoint_to_json
from .ranged_path import HEAD_BYTES, Misses, PieceCache, RangedContext, RangedPath, Reads, child_url
from .sandbox import Limits

MAX_HEADER_BYTES = 512 * 1024 * 1024
MIN_READ = HEAD_BYTES  # a read that missed is fetched as at least this many bytes
MIN_HINTED_READ = 4096  # bytes a reader said it will read: it knows what it needs
MERGE_GAP = 64 * 1024  # two ranges of one object closer than this are fetched as one
HINTED_MERGE_GAP = MIN_HINTED_READ  # ... but ranges a reader named (local headers) only this close
FETCH_THREADS = 16

T = TypeVar("T")


class RemoteObjects(Protocol):
    """An object store as the listing sees it (implemented by ``store``; called from several
    threads at once)."""

    def stat(self, url: str) -> int | None:
        """The object's size; None when there is no such object."""

    def read(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, end)`` range of the object, in order."""

    def listdir(self, url: str) -> dict[str, int] | None:
        """A directory (prefix): its child files' names and sizes; None when it is not one."""


@dataclass(slots=True)
class RangedReport:
    rounds: int = 0
    requests: int = 0  # byte ranges fetched
    bytes_read: int = 0
    objects: dict[str, int] = field(default_factory=dict)  # url -> size, of the objects the listing used
    header_digest: str = ""  # sha256 of the bytes the final round read (see header_digest)
    stats: int = 0  # stat calls
    listings: int = 0  # listdir calls


@dataclass(slots=True)
class RoundOutcome:
    checkpoint: Checkpoint | None
    error: CheckpointError | None
    misses: Misses
    reads: Reads


RoundRunner = Callable[[PieceCache, str, str | None], RoundOutcome]


def open_ranged_checkpoint(
    url: str,
    objects: RemoteObjects,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    max_rounds: int = 8,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[Checkpoint, RangedReport]:
    """List the checkpoint at ``url`` (an object, or a directory: a URL ending in "/", or one
    that is no object but lists as a directory). ``name`` as for ``open_checkpoint``; ``limits``:
    run each round in the sandboxed child."""
    fetcher = _Fetcher(objects, max_header_bytes)
    root = fetcher.start(url)
    if limits is None:
        return _rounds(fetcher, root, name, max_rounds, run_round_in_process)
    from .ranged_sandbox import SandboxedRounds

    with SandboxedRounds(limits) as sandboxed:
        return _rounds(fetcher, root, name, max_rounds, sandboxed.run)


def _rounds(
    fetcher: _Fetcher, root: str, name: str | None, max_rounds: int, run: RoundRunner
) -> tuple[Checkpoint, RangedReport]:
    report = fetcher.report
    for number in range(1, max_rounds + 1):
        report.rounds = number
        outcome = run(fetcher.cache, root, name)
        _check_confined(outcome.misses, root, fetcher.cache)
        if not outcome.misses:
            report.objects = {
                u: s for u in sorted(outcome.reads.objects) if (s := fetcher.cache.sizes.get(u)) is not None
            }
            report.header_digest = header_digest(fetcher.cache, outcome.reads, base_url(root, fetcher.cache))
            if outcome.error is not None:
                raise outcome.error
            assert outcome.checkpoint is not None
            return outcome.checkpoint, report
        fetcher.fetch(outcome.misses)
    raise CheckpointError("limit_exceeded", f"the header needs more than {max_rounds} rounds of reads")


def run_round_in_process(cache: PieceCache, root: str, name: str | None) -> RoundOutcome:
    ctx = RangedContext(cache)
    checkpoint: Checkpoint | None = None
    error: CheckpointError | None = None
    try:
        listed = open_checkpoint(ctx.path(root), name=name)  # type: ignore[arg-type]  # a RangedPath stands in
        # as the sandbox answers it: the same values whichever way a round ran
        checkpoint = checkpoint_from_json(json.loads(json.dumps(checkpoint_to_json(listed))))
    except CheckpointError as exc:
        error = exc
    return RoundOutcome(checkpoint, error, ctx.misses, ctx.reads)


def base_url(root: str, cache: PieceCache) -> str:
    """The directory the checkpoint's objects lie in: the root itself when it is a directory,
    else the root's parent (shards resolve beside their index)."""
    if cache.listings.get(root) is not None:
        return root
    return root.rsplit("/", 1)[0] if "/" in root.partition("://")[2] else root


def _confined(url: str, root: str, base: str) -> bool:
    return url == root or url == base or (url.startswith(base + "/") and "/" not in url[len(base) + 1 :])


def _check_confined(misses: Misses, root: str, cache: PieceCache) -> None:
    """The readers name only the root and plain names beside it (or in it); a round that asks for
    anything else is refused, never fetched."""
    base = base_url(root, cache)
    wanted = [*misses.ranges.urls(), *misses.hinted.urls(), *misses.objects, *misses.listings]
    for url in wanted:
        if not _confined(url, root, base):
            raise CheckpointError(
                "blocked_operation", f"listing asked for {url[:200]!r}, outside the checkpoint's directory"
            )


def header_digest(cache: PieceCache, reads: Reads, base: str) -> str:
    """sha256 over the bytes a round read, range by range in (url, start) order, each preceded
    by its object's name relative to ``base`` and its bounds (so the digest does not depend on
    where the checkpoint lies, and only on the bytes the listing used)."""
    digest = hashlib.sha256()
    for url in reads.ranges.urls():
        relative = url[len(base) + 1 :] if url.startswith(base + "/") else url
        for start, end in reads.ranges.merged(url):
            digest.update(f"{len(relative)}:{relative}:{start}:{end}\n".encode())
            digest.update(cache.get(url, start, end))
    return digest.hexdigest()


class _Fetcher:
    """Fetches what rounds missed into the cache, within the byte budget, counting."""

    def __init__(self, objects: RemoteObjects, max_bytes: int) -> None:
        self.objects = objects
        self.max_bytes = max_bytes
        self.cache = PieceCache()
        self.report = RangedReport()

    def _stat(self, url: str) -> int | None:  # called from several threads: counted by the caller
        size = self.objects.stat(url)
        if size is not None and (not isinstance(size, int) or size < 0):
            raise SourceChanged(f"the store gave {url} a size of {size!r}")
        return size

    def _listdir(self, url: str) -> dict[str, int] | None:
        listing = self.objects.listdir(url)
        if listing is None:
            return None
        return {name: size for name, size in listing.items() if _plain_name(name) and isinstance(size, int)}

    def start(self, url: str) -> str:
        """Find what ``url`` is and fetch round 1's bytes; returns the normalised root URL."""
        root = str(RangedPath(url, RangedContext(self.cache)))
        self.report.stats += 0 if url.endswith("/") else 1
        size = None if url.endswith("/") else self._stat(root)
        if size is None:
            self.report.listings += 1
            listing = self._listdir(root)
            if listing is None:
                raise SourceNotFound(f"no object or directory at {url[:300]}")
            self.cache.set_size(root, None)
            self.cache.set_listing(root, listing)
            return root
        self.cache.set_size(root, size)
        self._fetch_plan(self._plan({root: [_Want(s, e, MERGE_GAP) for s, e in _ends(size)]}))
        return root

    def fetch(self, misses: Misses) -> None:
        before = self.cache.cached_bytes(), len(self.cache.sizes), len(self.cache.listings)
        unknown = sorted(u for u in misses.objects | misses.listings if u not in self.cache.sizes)
        unlisted = sorted(u for u in misses.listings if u not in self.cache.listings)
        sizes = _parallel(self._stat, unknown)
        listings = _parallel(self._listdir, unlisted)
        self.report.stats += len(unknown)
        self.report.listings += len(unlisted)
        wanted: dict[str, list[_Want]] = {}
        for url, size in zip(unknown, sizes, strict=True):
            self.cache.set_size(url, size)
            if size:
                wanted.setdefault(url, []).extend(_Want(s, e, MERGE_GAP) for s, e in _ends(size))
        for url, listing in zip(unlisted, listings, strict=True):
            self.cache.set_listing(url, listing)
        for url in misses.hinted.urls():
            wanted.setdefault(url, []).extend(
                _Want(s, max(e, s + MIN_HINTED_READ), HINTED_MERGE_GAP) for s, e in misses.hinted.merged(url)
            )
        for url in misses.ranges.urls():
            wanted.setdefault(url, []).extend(
                _Want(s, max(e, s + MIN_READ, s + 2 * self.cache.run_before(url, s)), MERGE_GAP)
                for s, e in misses.ranges.merged(url)
            )
        plan = self._plan(wanted)
        if self.report.bytes_read + _total(plan) > self.max_bytes:  # no read-ahead: just what was missed
            missed = [*misses.ranges.by_url, *misses.hinted.by_url]
            exact = {
                u: [_Want(s, e, 0) for s, e in [*misses.ranges.merged(u), *misses.hinted.merged(u)]] for u in missed
            }
            plan = self._plan(exact)
        self._fetch_plan(plan)
        after = self.cache.cached_bytes(), len(self.cache.sizes), len(self.cache.listings)
        if after == before:  # cannot happen: every miss names something not known yet
            raise CheckpointError("corrupt", "listing made no progress: its reads name nothing that can be fetched")

    def _plan(self, wanted: dict[str, list[_Want]]) -> dict[str, list[tuple[int, int]]]:
        """Per object: the uncached parts of the wanted ranges (clamped to its size), sorted;
        two of them become one where the bytes between are uncached and fewer than both ranges'
        merge gaps."""
        plan: dict[str, list[tuple[int, int]]] = {}
        for url, ranges in wanted.items():
            size = self.cache.sizes.get(url) or 0
            spans = sorted(
                (lo, hi, w.gap) for w in ranges for lo, hi in self.cache.missing(url, max(w.start, 0), min(w.end, size))
            )
            merged: list[list[int]] = []
            for lo, hi, gap in spans:
                last = merged[-1] if merged else None
                if last is not None and (
                    lo <= last[1]
                    or (lo - last[1] < min(gap, last[2]) and self.cache.missing(url, last[1], lo) == [(last[1], lo)])
                ):
                    last[1], last[2] = max(last[1], hi), max(last[2], gap)
                else:
                    merged.append([lo, hi, gap])
            if merged:
                plan[url] = [(lo, hi) for lo, hi, _ in merged]
        return plan

    def _fetch_plan(self, plan: dict[str, list[tuple[int, int]]]) -> None:
        total = _total(plan)
        if self.report.bytes_read + total > self.max_bytes:
            raise CheckpointError(
                "limit_exceeded", f"the header needs more than {self.max_bytes} bytes of reads (max_header_bytes)"
            )
        urls = sorted(plan)
        results = _parallel(lambda u: self.objects.read(u, plan[u]), urls)
        for url, pieces in zip(urls, results, strict=True):
            ranges = plan[url]
            if len(pieces) != len(ranges):
                raise SourceChanged(f"the store answered {len(pieces)} ranges of {url} for {len(ranges)} asked")
            for (start, end), raw in zip(ranges, pieces, strict=True):
                data = raw if isinstance(raw, bytes) else memoryview(raw).cast("B")  # any buffer (obstore's Bytes)
                if len(data) != end - start:
                    raise SourceChanged(f"{url} gave {len(data)} bytes at {start} where {end - start} were asked")
                self.cache.add(url, start, data)
            self.report.requests += len(ranges)
            self.report.bytes_read += sum(e - s for s, e in ranges)


class _Want(NamedTuple):
    start: int
    end: int
    gap: int  # merged with a neighbour closer than this


def _ends(size: int) -> list[tuple[int, int]]:
    return [(0, min(size, HEAD_BYTES)), (max(size - HEAD_BYTES, 0), size)]


def _total(plan: dict[str, list[tuple[int, int]]]) -> int:
    return sum(e - s for ranges in plan.values() for s, e in ranges)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and name not in (".", "..") and "\x00" not in name


def _parallel(work: Callable[[str], T], urls: Sequence[str]) -> list[T]:
    if len(urls) <= 1:
        return [work(u) for u in urls]
    with ThreadPoolExecutor(min(FETCH_THREADS, len(urls))) as pool:
        return list(pool.map(work, urls))


__all__ = [
    "MAX_HEADER_BYTES",
    "RangedReport",
    "RemoteObjects",
    "child_url",
    "header_digest",
    "open_ranged_checkpoint",
    "run_round_in_process",
]
