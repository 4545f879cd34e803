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
import struct
import zipfile
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
from .zip_kinds import zip_refusal

MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_END_RECORD = struct.Struct("<4sHHHHIIH")  # end of central directory, 22 bytes + comment
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes (no extensible data)
_MAX_COMMENT = 0xFFFF
MAX_CACHED_PICKLE = 64 * 1024  # data.pkl files remembered by a PickleCache (a chunk's: ~300 bytes)
PickleCache = dict[bytes, tuple[Any, dict[str, PickledStorage], dict[str, Any]]]

DCP_SHARD_MESSAGE = (
    "this is one shard (.distcp) of a torch.distributed.checkpoint directory; open the directory, "
    "or upload its .metadata with all its .distcp files"
)


def _bad_zip(message: str) -> CheckpointError:
    return CheckpointError("corrupt_zip", message)


class _Window:
    """A byte range ``[start, start + length)`` of an open file, seen as a file of its own (what
    zipfile reads an archive from)."""

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


def _local_entry(fh: _Window, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(data offset, flags) of an entry, read from its local header, which must agree with the
    central directory."""
    raw = fh.read_at(info.header_offset, _LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise _bad_zip(f"zip entry {info.filename!r} has a truncated local header")
    sig, _ver, flags, method, _t, _d, _crc, _cs, _us, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if sig != b"PK\x03\x04":
        raise _bad_zip(f"zip entry {info.filename!r} has no local header where the directory says")
    name = fh.read(name_len)
    if name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != info.filename:
        raise _bad_zip(f"zip entry {info.filename!r} has a different name in its local header")
    if method != info.compress_type:
        raise _bad_zip(f"zip entry {info.filename!r} has a different compression in its local header")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, flags


@dataclass(frozen=True, slots=True)
class _EndRecords:
    cd_start: int  # where the central directory really starts in the range
    cd_declared: int  # where the end record says it starts (relative to the archive's start)
    entries: int  # entries the end record declares


def _end_records(fh: _Window, size: int) -> _EndRecords:
    """Find the end records as zipfile does (the last signature in the tail), and require that
    they close the range: the comment reaches its last byte, a zip64 record and locator sit right
    before the end record."""
    tail_start = max(0, size - _END_RECORD.size)
    tail = fh.read_at(tail_start, size - tail_start)  # no comment (torch writes none): 22 bytes
    if tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00":
        at = 0
    else:
        tail_start = max(0, size - _END_RECORD.size - _MAX_COMMENT)
        tail = fh.read_at(tail_start, size - tail_start)
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(tail):
        raise _bad_zip("the zip archive has no end of central directory record")
    _sig, _disk, _cd_disk, _n_disk, n_total, cd_size, cd_offset, comment_len = _END_RECORD.unpack_from(tail, at)
    end_pos = tail_start + at
    trailing = size - (end_pos + _END_RECORD.size + comment_len)
    if trailing != 0:
        what = f"{trailing} bytes after the end" if trailing > 0 else "an end record whose comment runs past the end"
        raise _bad_zip(f"the file is not one zip archive: {what} of the archive are not part of it")
    cd_end = end_pos
    locator_pos = end_pos - _ZIP64_LOCATOR.size
    if locator_pos >= 0:
        locator = fh.read_at(locator_pos, _ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _s, _d, record_declared, _disks = _ZIP64_LOCATOR.unpack(locator)
            record_pos = locator_pos - _ZIP64_END_RECORD.size
            record = fh.read_at(record_pos, _ZIP64_END_RECORD.size) if record_pos >= 0 else b""
            if len(record) != _ZIP64_END_RECORD.size or record[:4] != b"PK\x06\x06":
                raise _bad_zip("the zip64 end of central directory record is missing")
            _s, record_size, _v, _vn, _dn, _dcd, _nd, n_total, cd_size, cd_offset = _ZIP64_END_RECORD.unpack(record)
            if record_size != _ZIP64_END_RECORD.size - 12:
                raise _bad_zip("the zip64 end record has extensible data that is not part of the archive")
            cd_end = record_pos
            if record_declared != cd_offset + cd_size:  # the record follows the directory
                raise _bad_zip("the zip64 locator does not point at the zip64 end record")
    return _EndRecords(cd_end - cd_size, cd_offset, n_total)


def _descriptor_fits(raw: bytes, info: zipfile.ZipInfo) -> bool:
    """A data descriptor (after an entry written with flag bit 3): optional signature, CRC, then
    the two sizes in 4 or 8 bytes each."""
    body = raw[4:] if len(raw) in (16, 24) and raw[:4] == b"PK\x07\x08" else raw
    if len(body) == 12:
        _crc, csize, usize = struct.unpack("<III", body)
    elif len(body) == 20:
        _crc, csize, usize = struct.unpack("<IQQ", body)
    else:
        return False
    return bool(csize == info.compress_size and usize == info.file_size)


def _looks_like_archive_sequence(fh: _Window, start: int) -> bool:
    """True when the range starts with a zip entry and the bytes just before ``start`` (where the
    last archive begins) close another archive: several archives end to end, as in ``.distcp``."""
    if fh.read_at(0, 4) != b"PK\x03\x04" or fh.read_at(start, 4) != b"PK\x03\x04":
        return False
    lo = max(0, start - _END_RECORD.size - _MAX_COMMENT)
    before = fh.read_at(lo, start - lo)
    at = before.rfind(b"PK\x05\x06")
    while at >= 0:
        if at + _END_RECORD.size <= len(before):
            (comment_len,) = struct.unpack_from("<H", before, at + 20)
            if at + _END_RECORD.size + comment_len == len(before):
                return True
        at = before.rfind(b"PK\x05\x06", 0, at)
    return False


def _entry_reads(ordered: list[zipfile.ZipInfo], cd_start: int) -> list[tuple[int, int]]:
    """The byte ranges that reading the archive will read: every entry's local header and data
    descriptor, and the whole of the small entries that are not storages (data.pkl, byteorder)
    where they fit before the next entry as the directory says (a ranged file fetches them all in
    one round)."""
    ranges = []
    for n, info in enumerate(ordered):
        following = ordered[n + 1].header_offset if n + 1 < len(ordered) else cd_start
        header_end = info.header_offset + _LOCAL_HEADER.size + len(info.orig_filename.encode("utf-8")) + 64
        whole = header_end + info.compress_size
        small = "/data/" not in info.filename and info.compress_size <= MAX_PICKLE_BYTES
        ranges.append((info.header_offset, min(whole, following) if small else header_end))
        if info.flag_bits & 0x8:  # its data descriptor ends where the next entry starts
            ranges.append((max(info.header_offset, following - 24), following))
    return ranges


def check_whole_archive(fh: _Window, size: int, infos: list[zipfile.ZipInfo]) -> dict[str, int]:
    """Require that every byte of the range belongs to the archive; returns each entry's data
    offset. The entries start at byte 0 and follow each other (each with its data descriptor where
    its flags announce one), the central directory follows the last entry, the end records close
    the range."""
    end = _end_records(fh, size)
    prefix = end.cd_start - end.cd_declared
    if prefix > 0:
        if _looks_like_archive_sequence(fh, prefix):
            raise CheckpointError("dcp_shard", DCP_SHARD_MESSAGE)
        raise _bad_zip(f"the file is not one zip archive: its first {prefix} bytes are not part of the archive")
    if prefix < 0:
        raise _bad_zip("the zip central directory lies outside the file")
    if end.entries != len(infos):
        raise _bad_zip(f"the zip end record declares {end.entries} entries but its directory lists {len(infos)}")
    offsets: dict[str, int] = {}
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if fh.ranged:  # a local file has nothing to prefetch: the ranges are not worked out for it
        fh.will_read(_entry_reads(ordered, end.cd_start))
    position = 0
    for n, info in enumerate(ordered):
        if info.header_offset < position:
            raise _bad_zip(
                f"the file is not one zip archive: zip entry {info.filename[:100]!r} overlaps the one before it"
            )
        if info.header_offset > position:
            gap = info.header_offset - position
            raise _bad_zip(
                f"the file is not one zip archive: {gap} bytes before zip entry {info.filename[:100]!r} "
                "are not part of it"
            )
        data, flags = _local_entry(fh, info)
        position = data + info.compress_size
        following = ordered[n + 1].header_offset if n + 1 < len(ordered) else end.cd_start
        if position > following:
            raise _bad_zip(f"zip entry {info.filename[:100]!r} runs into the next entry or the directory")
        if flags & 0x8:
            gap = following - position
            if gap > 24 or not _descriptor_fits(fh.read_at(position, gap), info):
                raise _bad_zip(f"zip entry {info.filename[:100]!r} is not followed by its data descriptor")
            position = following
        offsets[info.filename] = data
    if position != end.cd_start:
        raise _bad_zip(f"the file is not one zip archive: {end.cd_start - position} bytes before its directory")
    return offsets


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
        try:
            archive = zipfile.ZipFile(fh)  # a file-like window
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _bad_zip(f"not a readable zip archive: {exc}") from None
        with archive:
            infos = archive.infolist()
            data_offsets = check_whole_archive(fh, length, infos)
            yield _validated(archive, fh, infos, data_offsets, str(path), start, key_prefix, pickle_cache)


def _validated(
    archive: zipfile.ZipFile,
    fh: _Window,
    infos: list[zipfile.ZipInfo],
    data_offsets: dict[str, int],
    path: str,
    start: int,
    key_prefix: str,
    pickle_cache: PickleCache | None = None,
) -> TorchArchive:
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
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
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.flag_bits & 0x1:
            raise _bad_zip(f"zip entry {info.filename!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _bad_zip(
                f"zip entry {info.filename!r} is compressed; PyTorch checkpoints store every entry uncompressed"
            )
        if info.compress_size != info.file_size:  # stored: the two sizes are one
            raise _bad_zip(f"zip entry {info.filename!r} declares two different sizes for its stored bytes")
        entries[info.filename] = info
    byteorder_info = entries.get(prefix + "byteorder")
    if byteorder_info is not None:
        order = archive.read(byteorder_info)[:16]
        if order != b"little":
            raise CheckpointError(
                "unsupported_byteorder", f"checkpoint byte order {order!r} is not supported (only little-endian)"
            )
    pkl_info = entries[pickles[0]]
    if pkl_info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError("limit_exceeded", "data.pkl is larger than the 256 MiB limit")
    pickled = fh.read_at(data_offsets[pkl_info.filename], pkl_info.file_size)
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
        ref = StorageRef(path, start + data_offsets[info.filename], root.nbytes, key_prefix + key)
        located[key] = ref
        return ref

    metadata = _ckptscope_metadata(archive, entries.get(prefix + "ckptscope.json"))
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


def _ckptscope_metadata(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> dict[str, str]:
    """Provenance that ckptscope's own exports store beside data.pkl (torch ignores the entry)."""
    if info is None or info.file_size > MAX_METADATA_BYTES:
        return {}
    try:
        data = json.loads(archive.read(info))
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and k.startswith("ckptscope.") and isinstance(v, str)}
