"""PyTorch zip checkpoints (``torch.save`` since 1.6): validated before anything is unpickled.

An archive is read from a byte range of a file (the whole file, or one item of a
torch.distributed.checkpoint ``.distcp`` file, which holds many ``torch.save`` archives end to
end). Every byte of the range must belong to the one archive: its entries start at the range's
first byte and follow each other without gaps, the central directory follows them and the end
records close the range. Python's zipfile alone would read the last archive of a ``.distcp`` file
and silently treat everything before it as a prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ckptscope.errors import CheckpointError

from .model import Checkpoint, StorageRef
from .pickle_graph import Census, WorkBudget
from .pickle_report import Roles, build_report
from .pickled_tree import build_checkpoint
from .ranged_path import RangedFile, as_path, will_read
from .torch_pickle import PickledStorage, PickleReader, role_of
from .torch_save_pattern import read_state_dict_pickle
from .zip_directory import DCP_SHARD_MESSAGE, MAX_PICKLE_BYTES, ZipEntry, read_directory, read_entry
from .zip_kinds import zip_refusal

__all__ = ["DCP_SHARD_MESSAGE", "MAX_PICKLE_BYTES", "PickleCache", "TorchArchive", "open_torch_archive"]
MAX_METADATA_BYTES = 1024 * 1024
MAX_CACHED_PICKLE = 64 * 1024  # data.pkl files remembered by a PickleCache (a chunk's: ~300 bytes)
PickleCache = dict[bytes, tuple[Any, dict[str, PickledStorage], dict[str, Any]]]


def _bad_zip(message: str) -> CheckpointError:
    return CheckpointError("corrupt_zip", message)


class _Window:
    """A byte range ``[start, start + length)`` of an open file, seen as a file of its own (what
    ``zip_directory`` reads an archive from; a local file's range is read there through a mapping)."""

    def __init__(self, fh: BinaryIO, start: int, length: int) -> None:
        self._fh = fh
        self._start = start
        self._length = length
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._length)[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the archive")
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._length - self._pos
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        self._fh.seek(self._start + self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def read_at(self, offset: int, n: int) -> bytes:
        self.seek(offset)
        return self.read(n)

    def close(self) -> None:  # the file belongs to the caller
        pass

    @property
    def ranged(self) -> bool:
        """An object store's file, whose reads are fetched in rounds (``will_read`` helps it)."""
        return isinstance(self._fh, RangedFile)

    def will_read(self, ranges: list[tuple[int, int]]) -> None:
        will_read(self._fh, [(self._start + a, self._start + min(b, self._length)) for a, b in ranges])

    def fileno_and_start(self) -> tuple[int, int] | None:
        """A local file's descriptor and the range's start in it (read through a mapping)."""
        try:
            return self._fh.fileno(), self._start
        except (OSError, AttributeError, ValueError):
            return None


@dataclass(slots=True)
class TorchArchive:
    """A validated ``torch.save`` archive: the unpickled object (``PickledTensor`` leaves), a
    locator giving each storage's bytes (offsets absolute in the file), and ckptscope's own
    provenance entries."""

    obj: Any
    locate: Callable[[PickledStorage], StorageRef]
    metadata: dict[str, str]
    pickle: dict[str, Any]  # the pickle report of data.pkl


@contextmanager
def open_torch_archive(
    path: str | Path,
    start: int = 0,
    length: int | None = None,
    key_prefix: str = "",
    pickle_cache: PickleCache | None = None,
) -> Iterator[TorchArchive]:
    """Read the archive filling ``[start, start + length)`` of ``path`` (the whole file by
    default). Storage keys get ``key_prefix`` (archives of one file must not share keys).
    ``pickle_cache`` remembers what each ``data.pkl`` read to (the many chunk archives of one DCP set
    mostly hold the same pickle, byte for byte; the values read are immutable)."""
    path = as_path(path)
    file_size = path.stat().st_size
    if length is None:
        length = file_size - start
    if start < 0 or length < 0 or start + length > file_size:
        raise _bad_zip("the archive's byte range lies outside the file")
    with path.open("rb") as raw:
        fh = _Window(raw, start, length)
        entries, data_offsets = read_directory(fh, length)
        yield _validated(fh, entries, data_offsets, str(path), start, key_prefix, pickle_cache)


def _validated(
    fh: _Window,
    infos: list[ZipEntry],
    data_offsets: list[int],
    path: str,
    start: int,
    key_prefix: str,
    pickle_cache: PickleCache | None = None,
) -> TorchArchive:
    names = [i.name for i in infos]
    entries: dict[str, ZipEntry] = dict(zip(names, infos, strict=True))
    if len(entries) != len(names):
        raise _bad_zip("zip archive has duplicate entry names")
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            "torchscript",
            "this is a TorchScript archive (torch.jit.save); it holds code as well as weights "
            "and is not read. Save model.state_dict() with torch.save instead",
        )
    if len(pickles) != 1:
        what = "no data.pkl" if not pickles else "more than one data.pkl"
        not_torch = CheckpointError("not_torch_zip", f"zip archive is not a PyTorch checkpoint ({what})")
        raise zip_refusal(names) or not_torch  # an .npz, .pt2 or .keras says what it is
    prefix = pickles[0][: -len("data.pkl")]
    offsets = dict(zip(names, data_offsets, strict=True))
    for info in infos:
        if info.flags & 0x1:
            raise _bad_zip(f"zip entry {info.name!r} is encrypted")
        if info.method != 0:
            raise _bad_zip(f"zip entry {info.name!r} is compressed; PyTorch checkpoints store every entry uncompressed")
        if info.compress_size != info.file_size:  # stored: the two sizes are one
            raise _bad_zip(f"zip entry {info.name!r} declares two different sizes for its stored bytes")
    byteorder_info = entries.get(prefix + "byteorder")
    if byteorder_info is not None:
        order = read_entry(fh, byteorder_info)[:16]
        if order != b"little":
            raise CheckpointError(
                "unsupported_byteorder", f"checkpoint byte order {order!r} is not supported (only little-endian)"
            )
    pkl_info = entries[pickles[0]]
    if pkl_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError("limit_exceeded", "data.pkl is larger than the 256 MiB limit")
    pickled = fh.read_at(offsets[pkl_info.name], pkl_info.file_size)
    known = pickle_cache.get(pickled) if pickle_cache is not None else None
    if known is None:
        known = _state_dict_pattern(pickled)
        if known is None:
            reader = PickleReader(WorkBudget.for_bytes(len(pickled)))
            loaded = reader.load(pickled)
            known = (*loaded, reader.report())
        if pickle_cache is not None and len(pickled) <= MAX_CACHED_PICKLE:
            pickle_cache[pickled] = known
    obj, storages, report = known

    located: dict[str, StorageRef] = {}

    def locate(storage: PickledStorage) -> StorageRef:
        key = storage.root_key or storage.key
        if key in located:
            return located[key]
        root = storages[key]
        info = entries.get(f"{prefix}data/{key}")
        if info is None:
            raise _bad_zip(f"storage {key!r} has no data entry in the archive")
        if info.file_size != root.nbytes:
            raise _bad_zip(f"storage {key!r} declares {root.nbytes} bytes but its entry holds {info.file_size}")
        ref = StorageRef(path, start + offsets[info.name], root.nbytes, key_prefix + key)
        located[key] = ref
        return ref

    metadata = _ckptscope_metadata(fh, entries.get(prefix + "ckptscope.json"))
    return TorchArchive(obj, locate, metadata, report)


def _state_dict_pattern(pickled: bytes) -> tuple[Any, dict[str, PickledStorage], dict[str, Any]] | None:
    """``data.pkl`` read by the state-dict fast path (``torch_save_pattern``), with the report the
    general path would give; None when the pickle is not that pattern."""
    fast = read_state_dict_pickle(pickled)
    if fast is None:
        return None
    obj, storages, counts = fast
    census = Census()
    census.counts.update(counts)
    roles = Roles()
    for key in counts:  # as the interpreter uses them: OrderedDict() calls, the rest for tensors
        roles.used(key, "data" if key == ("collections", "OrderedDict") else "tensor")
    return obj, storages, build_report(census, roles, role_of)


def read_torch_zip(path: str | Path) -> Checkpoint:
    with open_torch_archive(path) as archive:
        checkpoint = build_checkpoint(archive.obj, "torch-zip", archive.locate, [str(path)])
        checkpoint.metadata.update(archive.metadata)
        checkpoint.pickle = archive.pickle
        return checkpoint


def _ckptscope_metadata(fh: _Window, info: ZipEntry | None) -> dict[str, str]:
    """Provenance that ckptscope's own exports store beside data.pkl (torch ignores the entry)."""
    if info is None or info.file_size > MAX_METADATA_BYTES:
        return {}
    try:
        data = json.loads(read_entry(fh, info))
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and k.startswith("ckptscope.") and isinstance(v, str)}
