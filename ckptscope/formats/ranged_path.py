"""Paths and files over an object store's bytes, for the readers (``ranged.py`` runs the rounds).

A ``RangedPath`` stands in for a ``pathlib.Path`` (the few methods the readers use) and a
``RangedFile`` for an open binary file. Their bytes come from a ``PieceCache`` of byte ranges
already fetched; nothing here does any I/O. A read of bytes that are not cached gets zeros for them
and notes the miss in the ``Misses`` log, a name whose size is not known yet notes an "unknown
object" (and answers as an object of size 0 until known), a directory not listed yet an "unlisted
directory". The round that read zeros is then thrown away and run again once the misses are
fetched; everything it read before its first miss was real, so each round gets further.

Readers call the helpers at the end (``as_path``, ``will_read``, ``will_open``, ``head_stream``):
for local files they change nothing; for ranged ones they tell, before a loop, which bytes the loop
will need, so that one round fetches them all instead of one round per item.
"""

from __future__ import annotations

import bisect
import contextlib
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar, cast

HEAD_BYTES = 64 * 1024  # what a first look at an object reads from each of its ends
Buffer = bytes | memoryview
T = TypeVar("T")


class Ranges:
    """A union of ``[start, end)`` byte ranges per URL; consecutive records that touch merge as
    they come (readers read sequentially), the rest when asked."""

    def __init__(self) -> None:
        self.by_url: dict[str, list[list[int]]] = {}

    def add(self, url: str, start: int, end: int) -> None:
        if end <= start:
            return
        runs = self.by_url.setdefault(url, [])
        if runs and runs[-1][0] <= start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])

    def merged(self, url: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for start, end in sorted(self.by_url.get(url, ())):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        return out

    def urls(self) -> list[str]:
        return sorted(self.by_url)

    def __bool__(self) -> bool:
        return bool(self.by_url)

    def to_json(self) -> dict[str, list[list[int]]]:
        return {url: [list(r) for r in self.merged(url)] for url in self.urls()}

    @classmethod
    def from_json(cls, data: Any) -> Ranges:
        out = cls()
        for url, runs in dict(data).items():
            for start, end in runs:
                out.add(str(url), int(start), int(end))
        return out


class Misses:
    """What a round needed and the cache did not have."""

    def __init__(self) -> None:
        self.ranges = Ranges()  # bytes of known objects a reader read
        self.hinted = Ranges()  # bytes of known objects a reader said it will read (will_read)
        self.objects: set[str] = set()  # names whose size (or absence) is not known
        self.listings: set[str] = set()  # directories not listed

    def __bool__(self) -> bool:
        return bool(self.ranges or self.hinted or self.objects or self.listings)

    def to_json(self) -> dict[str, Any]:
        return {
            "ranges": self.ranges.to_json(),
            "hinted": self.hinted.to_json(),
            "objects": sorted(self.objects),
            "listings": sorted(self.listings),
        }

    @classmethod
    def from_json(cls, data: Any) -> Misses:
        out = cls()
        out.ranges = Ranges.from_json(data.get("ranges", {}))
        out.hinted = Ranges.from_json(data.get("hinted", {}))
        out.objects = {str(u) for u in data.get("objects", ())}
        out.listings = {str(u) for u in data.get("listings", ())}
        return out


class Reads:
    """What a round read from the cache: byte ranges, and the objects whose size it used."""

    def __init__(self) -> None:
        self.ranges = Ranges()
        self.objects: set[str] = set()

    def to_json(self) -> dict[str, Any]:
        return {"ranges": self.ranges.to_json(), "objects": sorted(self.objects)}

    @classmethod
    def from_json(cls, data: Any) -> Reads:
        out = cls()
        out.ranges = Ranges.from_json(data.get("ranges", {}))
        out.objects = {str(u) for u in data.get("objects", ())}
        return out


class PieceCache:
    """Fetched byte ranges of objects (never overlapping), objects' sizes (None: no such object)
    and directories' listings (child file name -> size; None: not a directory)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int | None] = {}
        self.listings: dict[str, dict[str, int] | None] = {}
        self._starts: dict[str, list[int]] = {}
        self._pieces: dict[str, list[tuple[int, int, Buffer]]] = {}

    def set_size(self, url: str, size: int | None) -> None:
        self.sizes[url] = size

    def set_listing(self, url: str, listing: dict[str, int] | None) -> None:
        self.listings[url] = listing
        for name, size in (listing or {}).items():
            self.sizes.setdefault(child_url(url, name), size)

    def add(self, url: str, start: int, data: Buffer) -> None:
        """Cache ``data`` at ``start``; its bytes must not be cached already."""
        if not len(data):
            return
        end = start + len(data)
        if self.missing(url, start, end) != [(start, end)]:
            raise ValueError(f"bytes {start}..{end} of {url} are cached already")
        starts = self._starts.setdefault(url, [])
        at = bisect.bisect(starts, start)
        starts.insert(at, start)
        self._pieces.setdefault(url, []).insert(at, (start, end, data))

    def pieces(self, url: str) -> list[tuple[int, int, Buffer]]:
        return list(self._pieces.get(url, ()))

    def urls(self) -> list[str]:
        return sorted(self._pieces)

    def cached_bytes(self) -> int:
        return sum(e - s for pieces in self._pieces.values() for s, e, _ in pieces)

    def _overlapping(self, url: str, start: int, end: int) -> list[tuple[int, int, Buffer]]:
        starts = self._starts.get(url)
        if not starts:
            return []
        pieces = self._pieces[url]
        at = max(bisect.bisect(starts, start) - 1, 0)
        out = []
        while at < len(pieces) and pieces[at][0] < end:
            if pieces[at][1] > start:
                out.append(pieces[at])
            at += 1
        return out

    def missing(self, url: str, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that are not cached."""
        out: list[tuple[int, int]] = []
        position = start
        for s, e, _ in self._overlapping(url, start, end):
            if s > position:
                out.append((position, s))
            position = max(position, e)
        if position < end:
            out.append((position, end))
        return out

    def get(self, url: str, start: int, end: int) -> bytes:
        """Cached bytes of ``[start, end)`` (zeros where none are cached)."""
        out = bytearray(max(end - start, 0))
        self.fill(url, start, memoryview(out), Misses(), Reads())
        return bytes(out)

    def run_before(self, url: str, position: int) -> int:
        """How many cached bytes end exactly at ``position`` without a gap (a reader scanning
        forward has read them)."""
        starts = self._starts.get(url)
        if not starts:
            return 0
        pieces = self._pieces[url]
        at = bisect.bisect_left(starts, position) - 1
        total, edge = 0, position
        while at >= 0 and pieces[at][1] == edge:
            total += pieces[at][1] - pieces[at][0]
            edge = pieces[at][0]
            at -= 1
        return total

    def fill(self, url: str, start: int, out: memoryview, misses: Misses, reads: Reads) -> None:
        """Copy ``[start, start + len(out))`` into ``out``: cached bytes as they are, zeros for the
        rest (each gap noted as a miss)."""
        end = start + len(out)
        position = start
        for s, e, data in self._overlapping(url, start, end):
            lo, hi = max(s, start), min(e, end)
            if lo > position:
                out[position - start : lo - start] = bytes(lo - position)
                misses.ranges.add(url, position, lo)
            out[lo - start : hi - start] = data[lo - s : hi - s]
            reads.ranges.add(url, lo, hi)
            position = max(position, hi)
        if position < end:
            out[position - start :] = bytes(end - position)
            misses.ranges.add(url, position, end)


def child_url(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


class RangedContext:
    """One round's view: the cache it reads from and the logs it writes to."""

    def __init__(self, cache: PieceCache) -> None:
        self.cache = cache
        self.misses = Misses()
        self.reads = Reads()
        self.resources: list[object] = []  # what the cache's pieces live in (a child's mapping)

    def path(self, url: str) -> RangedPath:
        return RangedPath(url, self)

    def size(self, url: str) -> int | None:
        """The object's size; None when there is no such object; 0 (noted) when not known yet."""
        if url in self.cache.sizes:
            size = self.cache.sizes[url]
            if size is not None:
                self.reads.objects.add(url)
            return size
        self.misses.objects.add(url)
        return 0

    def will_read(self, url: str, ranges: Iterable[tuple[int, int]]) -> None:
        size = self.size(url)
        if not size:
            return
        for start, end in ranges:
            for lo, hi in self.cache.missing(url, max(start, 0), min(end, size)):
                self.misses.hinted.add(url, lo, hi)

    def will_open(self, url: str) -> None:
        size = self.size(url)
        if size:
            self.will_read(url, [(0, HEAD_BYTES), (size - HEAD_BYTES, size)])


class _Stat(NamedTuple):
    st_size: int


def _not_found(url: str) -> FileNotFoundError:
    return FileNotFoundError(2, "No such file or directory", url)


class RangedPath:
    """An object (or a directory: a prefix) of a store, named by its URL ("s3://bucket/a/b")."""

    __slots__ = ("_ctx", "_url")

    def __init__(self, url: str, ctx: RangedContext) -> None:
        stripped = url.rstrip("/")
        self._url = stripped if "://" in stripped and stripped.split("://", 1)[1] else url
        self._ctx = ctx

    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"RangedPath({self._url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangedPath) and other._url == self._url

    def __hash__(self) -> int:
        return hash(("RangedPath", self._url))

    @property
    def name(self) -> str:
        scheme, _, rest = self._url.partition("://")
        return rest.rsplit("/", 1)[-1] if "/" in rest else ""

    @property
    def parent(self) -> RangedPath:
        scheme, _, rest = self._url.partition("://")
        if "/" not in rest:  # the bucket is its own parent, as "/" is
            return self
        return RangedPath(f"{scheme}://{rest.rsplit('/', 1)[0]}", self._ctx)

    def __truediv__(self, name: str) -> RangedPath:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\x00" in name:
            raise ValueError(f"{str(name)[:100]!r} is not a plain name")
        if name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain name")
        return RangedPath(child_url(self._url, name), self._ctx)

    def _is_listed_dir(self) -> bool | None:
        listings = self._ctx.cache.listings
        if self._url in listings:
            return listings[self._url] is not None
        return None

    def is_dir(self) -> bool:
        listed = self._is_listed_dir()
        if listed is not None:
            return listed
        if self._ctx.cache.sizes.get(self._url) is not None:
            return False
        self._ctx.misses.listings.add(self._url)
        return False

    def is_file(self) -> bool:
        if self._is_listed_dir() and self._ctx.cache.sizes.get(self._url) is None:
            return False
        return self._ctx.size(self._url) is not None

    def exists(self) -> bool:
        return bool(self._is_listed_dir()) or self._ctx.size(self._url) is not None

    def stat(self) -> _Stat:
        if self._is_listed_dir():
            return _Stat(0)
        size = self._ctx.size(self._url)
        if size is None:
            raise _not_found(self._url)
        return _Stat(size)

    def open(self, mode: str = "rb") -> RangedFile:
        if mode != "rb":
            raise ValueError(f"a ranged object opens for reading only (mode 'rb', not {mode!r})")
        size = self._ctx.size(self._url)
        if size is None:
            raise _not_found(self._url)
        return RangedFile(self._url, size, self._ctx)

    def read_bytes(self) -> bytes:
        with self.open() as fh:
            return fh.read()

    def will_read(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._ctx.will_read(self._url, ranges)

    def will_open(self) -> None:
        self._ctx.will_open(self._url)

    def list_folder(self) -> dict[str, RangedPath]:
        """The directory's files by name (empty, noted, while it is not listed)."""
        listings = self._ctx.cache.listings
        if self._url not in listings:
            self._ctx.misses.listings.add(self._url)
            return {}
        listing = listings[self._url]
        if listing is None:
            raise NotADirectoryError(20, "Not a directory", self._url)
        return {name: self / name for name in sorted(listing)}


class RangedFile(io.RawIOBase):
    """A seekable read-only binary file over one object's cached bytes (``[0, size)``)."""

    def __init__(self, url: str, size: int, ctx: RangedContext) -> None:
        super().__init__()
        self._url = url
        self._size = size
        self._ctx = ctx
        self._pos = 0

    @property
    def name(self) -> str:
        return self._url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        if base + offset < 0:
            raise OSError(22, "Invalid argument")
        self._pos = base + offset
        return self._pos

    def _take(self, n: int | None) -> int:
        left = max(self._size - self._pos, 0)
        return left if n is None or n < 0 else min(n, left)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._take(len(view))
        if n:
            self._ctx.cache.fill(self._url, self._pos, view[:n], self._ctx.misses, self._ctx.reads)
            self._pos += n
        return n

    def read(self, n: int | None = -1) -> bytes:
        count = self._take(n)
        out = bytearray(count)
        if count:
            self._ctx.cache.fill(self._url, self._pos, memoryview(out), self._ctx.misses, self._ctx.reads)
            self._pos += count
        return bytes(out)

    def readall(self) -> bytes:
        return self.read(-1)

    def will_read(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._ctx.will_read(self._url, ranges)

    def head(self, n: int) -> RangedFile:
        """The file's first ``n`` bytes as a file of their own."""
        return RangedFile(self._url, min(self._size, n), self._ctx)


# --- what the readers call ---------------------------------------------------------------------


def is_ranged(target: object) -> bool:
    return isinstance(target, RangedPath | RangedFile)


def as_path(path: str | Path) -> Path:
    """``Path(path)``, except that a RangedPath stays itself (it has the methods of a Path that
    the readers use: name, parent, /, stat, open, read_bytes, is_file, is_dir, exists)."""
    if isinstance(path, RangedPath):
        return cast(Path, path)
    return Path(path)


def will_read(target: object, ranges: Sequence[tuple[int, int]]) -> None:
    """Tell a ranged path or file which byte ranges a loop is about to read, so that they are all
    fetched in one round; nothing for a local file."""
    if isinstance(target, RangedPath | RangedFile):
        target.will_read(ranges)


def will_open(paths: Iterable[object]) -> None:
    """Tell ranged paths that a loop is about to open each of them (their sizes and both ends are
    fetched in one round); nothing for local files."""
    for path in paths:
        if isinstance(path, RangedPath):
            path.will_open()


def open_all_on_miss(open_one: Callable[[Path], T], paths: Sequence[object]) -> Callable[[Path], T]:
    """``open_one``, except that in a ranged round that has missed bytes (so the failure may come
    from zeros), a failure to open one of ``paths`` first opens the ones after it, so that one
    round notes what each of them misses; the failure is then raised as it was."""

    def open_noting(path: Path) -> T:
        try:
            return open_one(path)
        except Exception:
            ranged = cast(object, path)
            if isinstance(ranged, RangedPath) and ranged._ctx.misses and ranged in paths:
                for other in paths[paths.index(ranged) + 1 :]:
                    if isinstance(other, RangedPath):
                        with contextlib.suppress(Exception):
                            open_one(cast(Path, other))
            raise

    return open_noting


def head_stream(raw: BinaryIO, n: int) -> BinaryIO:
    """The first ``n`` bytes of an open file as a stream: read into memory for a local file; a
    view for a ranged one (whose bytes are fetched as a parser gets to them)."""
    if isinstance(raw, RangedFile):
        return cast(BinaryIO, raw.head(n))
    return io.BytesIO(raw.read(n))


def ranged_folder(directory: object) -> dict[str, Path] | None:
    """A ranged directory's files by name (None for a local directory)."""
    if isinstance(directory, RangedPath):
        return cast(dict[str, Path], directory.list_folder())
    return None
