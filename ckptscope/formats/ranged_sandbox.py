"""Ranged rounds in the sandboxed child: the cache handed over as read-only files.

The parent writes every fetched piece once to ``pieces.bin`` in a private temporary directory
(appended as rounds fetch more) and, before each round, ``index.json``: the known sizes, the
listings and where each piece lies in ``pieces.bin``. The child maps the pieces read-only before
its audit hook is armed, runs ``open_checkpoint`` over ``RangedPath``s, and answers the
checkpoint JSON with its misses and the ranges it read (``sandbox.py``).
"""

from __future__ import annotations

import json
import mmap
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from ckptscope.errors import CheckpointError

from .model import checkpoint_from_json
from .ranged import RoundOutcome
from .ranged_path import Misses, PieceCache, RangedContext, Reads
from .sandbox import Limits, answer_error, run_sandboxed

PIECES = "pieces.bin"
INDEX = "index.json"


class PieceSpool:
    """A cache's pieces and facts as files in a private directory (mode 0700)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ckptscope-ranged-"))
        self._written: set[tuple[str, int]] = set()
        self._table: list[list[Any]] = []
        self._offset = 0

    def sync(self, cache: PieceCache) -> None:
        with (self.directory / PIECES).open("ab") as out:
            for url in cache.urls():
                for start, end, data in cache.pieces(url):
                    if (url, start) in self._written:
                        continue
                    out.write(data)
                    self._written.add((url, start))
                    self._table.append([url, start, end, self._offset])
                    self._offset += end - start
        index = {"sizes": cache.sizes, "listings": cache.listings, "pieces": self._table}
        (self.directory / INDEX).write_text(json.dumps(index))

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def load_spool(directory: str) -> tuple[PieceCache, mmap.mmap | None]:
    """The cache a parent spooled (in the child, before the audit hook is armed); the pieces stay
    in the read-only mapping returned with it."""
    base = Path(directory)
    index = json.loads((base / INDEX).read_text())
    cache = PieceCache()
    for url, size in index["sizes"].items():
        cache.set_size(url, size)
    for url, listing in index["listings"].items():
        cache.listings[url] = listing
    mapping = None
    with (base / PIECES).open("rb") as fh:
        if index["pieces"]:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if mapping is not None:
        view = memoryview(mapping)
        for url, start, end, offset in index["pieces"]:
            cache.add(url, start, view[offset : offset + end - start])
    return cache, mapping


def child_context(request: dict[str, Any]) -> RangedContext:
    cache, mapping = load_spool(str(request["dir"]))
    ctx = RangedContext(cache)
    ctx.resources.append(mapping)
    return ctx


def trace_json(ctx: RangedContext) -> dict[str, Any]:
    return {"misses": ctx.misses.to_json(), "reads": ctx.reads.to_json()}


class SandboxedRounds:
    """Runs each round in the sandboxed child; ``with`` removes the spool afterwards."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.spool = PieceSpool()

    def __enter__(self) -> SandboxedRounds:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.spool.close()

    def run(self, cache: PieceCache, root: str, name: str | None) -> RoundOutcome:
        self.spool.sync(cache)
        request = {"path": root, "name": name, "ranged": {"dir": str(self.spool.directory)}}
        answer = run_sandboxed(request, self.limits, root)
        trace = answer.get("ranged")
        try:
            misses = Misses.from_json(trace["misses"]) if isinstance(trace, dict) else Misses()
            reads = Reads.from_json(trace["reads"]) if isinstance(trace, dict) else Reads()
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError("parser_crashed", "the parser answered a malformed round") from None
        if answer.get("ok"):
            return RoundOutcome(checkpoint_from_json(answer["checkpoint"]), None, misses, reads)
        error: CheckpointError = answer_error(answer)
        return RoundOutcome(None, error, misses, reads)
