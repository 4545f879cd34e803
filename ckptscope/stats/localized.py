"""Tensors whose bytes live in an object store, made readable by the code that maps local files
(previews, values, spectra, diffs, copies and exports): every storage they name that the reader
has no local path for is copied once into one temp file, and the tensors are pointed into it.

Whole storages are copied and keep their keys, so tensors that share a storage still share it
(a tied embedding stays tied in an export). The stats engine does not use this: it reads byte
ranges by tasks (``spool.py``), never more than its tensors' bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ckptscope.errors import SourceChanged
from ckptscope.formats.model import Piece, StorageRef, TensorInfo, byte_parts

if TYPE_CHECKING:
    from .spool import RangeReader

ALIGN = 4096  # each storage keeps its offset modulo this in the copy (alignment, page boundaries)
Storage = tuple[str, int, int]  # (path, offset, nbytes)


def _moved(info: TensorInfo, spool: str, placed: dict[Storage, int]) -> TensorInfo:
    s = info.storage
    at = placed.get((s.path, s.offset, s.nbytes))
    moved = info if at is None else info._replace(storage=StorageRef(spool, at, s.nbytes, s.key))
    if info.pieces:
        moved = moved._replace(pieces=tuple(Piece(p.offsets, _moved(p.info, spool, placed)) for p in info.pieces))
    if info.quant is not None:
        q = info.quant
        moved = moved._replace(
            quant=q._replace(
                scales=None if q.scales is None else _moved(q.scales, spool, placed),
                zero_points=None if q.zero_points is None else _moved(q.zero_points, spool, placed),
            )
        )
    return moved


@contextmanager
def localized(
    tensors: Sequence[TensorInfo], reader: RangeReader, scratch_dir: str | None = None
) -> Iterator[list[TensorInfo]]:
    """The tensors with every byte they name in a local file, for the duration of the block; the
    copy (in ``scratch_dir``) is deleted afterwards, also on error."""
    wanted = sorted(
        {
            (p.storage.path, p.storage.offset, p.storage.nbytes)
            for t in tensors
            for p in byte_parts(t)
            if p.storage.nbytes > 0 and reader.local_path(p.storage.path) is None
        }
    )
    if not wanted:
        yield list(tensors)
        return
    fd, spool = tempfile.mkstemp(prefix="ckptscope-ranges-", suffix=".bin", dir=scratch_dir)
    try:
        placed: dict[Storage, int] = {}
        with os.fdopen(fd, "w+b") as out:
            cursor = 0
            for path, offset, nbytes in wanted:
                pos = cursor + (offset - cursor) % ALIGN
                out.seek(pos)
                written = reader.copy_range(path, offset, offset + nbytes, out)
                if written != nbytes:
                    raise SourceChanged(f"{path}: read {written} bytes at {offset} where the listing has {nbytes}")
                placed[(path, offset, nbytes)] = pos
                cursor = pos + nbytes
        yield [_moved(t, spool, placed) for t in tensors]
    finally:
        try:
            os.unlink(spool)
        except FileNotFoundError:
            pass
