"""A torch zip's directory, read in one pass with ``struct`` (Python's zipfile builds a ZipInfo per
entry, ~2.5 us each: most of a 20,000-tensor listing), and checked whole.

``read_directory`` reads the end records and the central directory as ``zipfile.ZipFile`` does
(the same search for the end record, the same zip64 rules, the same refusals in its words:
"File is not a zip file", "Truncated central directory", "Bad magic number for central directory",
"Corrupt extra field ...", a strict name decoding, a version above 6.3 refused), then requires that
every byte of the range belongs to the one archive (the checks ``torch_zip`` documents): the end
records close the range, the entries start at its first byte and follow each other without gaps or
overlaps, each local header agrees with the directory (signature, name, compression), each entry
with flag bit 3 is followed by its data descriptor, the directory follows the last entry.

``read_entry`` reads one small entry's bytes as ``zipfile.ZipFile.read`` does for a stored entry
(its local header read again and checked, its CRC-32 checked).
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ckptscope.errors import CheckpointError

_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # zipfile's structCentralDir, 46 bytes
_LOCAL = struct.Struct("<4s2xHH16xHH")  # signature, flags, method, name and extra lengths: 30 bytes
_LOCAL_SIZE = 30
_END_RECORD = struct.Struct("<4sHHHHIIH")  # 22 bytes + comment
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes (no extensible data)
_DESCRIPTOR_12 = struct.Struct("<III")
_DESCRIPTOR_20 = struct.Struct("<IQQ")
_MAX_COMMENT = 0xFFFF
MAX_EXTRACT_VERSION = 63  # zipfile's
MAX_PICKLE_BYTES = 256 * 1024 * 1024

DCP_SHARD_MESSAGE = (
    "this is one shard (.distcp) of a torch.distributed.checkpoint directory; open the directory, "
    "or upload its .metadata with all its .distcp files"
)


class ZipReadError(Exception):
    """What zipfile raised (BadZipFile, EOFError, NotImplementedError) where it reads an entry and
    ``torch_zip`` did not turn it into its own words: the reader's caller says the zip is damaged."""


class Source(Protocol):
    """The archive's byte range as ``torch_zip._Window`` gives it."""

    def read_at(self, offset: int, n: int) -> bytes: ...

    @property
    def ranged(self) -> bool: ...

    def will_read(self, ranges: list[tuple[int, int]]) -> None: ...

    def fileno_and_start(self) -> tuple[int, int] | None: ...


class ZipEntry(NamedTuple):
    """One central directory entry, as zipfile reads it (sizes and offset after the zip64 extra)."""

    name: str  # zipfile's ``filename``: the decoded name up to its first NUL
    raw_name: bytes  # the name's bytes as the directory holds them
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int

    @property
    def orig_name(self) -> str:
        return self.raw_name.decode("utf-8" if self.flags & 0x800 else "cp437")


def bad_zip(message: str) -> CheckpointError:
    return CheckpointError("corrupt_zip", message)


def _unreadable(reason: str) -> CheckpointError:
    return bad_zip(f"not a readable zip archive: {reason}")


class _End(NamedTuple):
    location: int  # where the end record starts
    comment_len: int
    zip64: bool  # zipfile took the zip64 record's values
    entries: int
    cd_size: int
    cd_offset: int


def _zip64(read_at: Callable[[int, int], bytes], end: _End) -> _End:
    """zipfile's _EndRecData64: the zip64 record's values where a locator and a record sit right
    before the end record; the end record's own where either is not there."""
    locator_pos = end.location - _ZIP64_LOCATOR.size
    if locator_pos < 0:
        return end
    locator = read_at(locator_pos, _ZIP64_LOCATOR.size)
    if len(locator) != _ZIP64_LOCATOR.size:
        return end
    sig, disk, _record, disks = _ZIP64_LOCATOR.unpack(locator)
    if sig != b"PK\x06\x07":
        return end
    if disk != 0 or disks > 1:
        raise _unreadable("zipfiles that span multiple disks are not supported")
    record_pos = locator_pos - _ZIP64_END_RECORD.size
    if record_pos < 0:  # zipfile's seek before the start fails: "File is not a zip file"
        raise _unreadable("File is not a zip file")
    record = read_at(record_pos, _ZIP64_END_RECORD.size)
    if len(record) != _ZIP64_END_RECORD.size:
        return end
    sig, _sz, _v, _vn, _dn, _dcd, _n_disk, n_total, cd_size, cd_offset = _ZIP64_END_RECORD.unpack(record)
    if sig != b"PK\x06\x06":
        return end
    return _End(end.location, end.comment_len, True, n_total, cd_size, cd_offset)


def _end_record(read_at: Callable[[int, int], bytes], size: int) -> _End:
    """zipfile's _EndRecData: the end record at the very end (no comment), else the last signature
    in the tail."""
    if size < _END_RECORD.size:
        raise _unreadable("File is not a zip file")
    tail = read_at(size - _END_RECORD.size, _END_RECORD.size)
    if len(tail) == _END_RECORD.size and tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00":
        _s, _d, _cdd, _nd, n_total, cd_size, cd_offset, comment_len = _END_RECORD.unpack(tail)
        end = _End(size - _END_RECORD.size, comment_len, False, n_total, cd_size, cd_offset)
        return _zip64(read_at, end)
    lo = max(size - (1 << 16) - _END_RECORD.size, 0)
    data = read_at(lo, size - lo)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(data):
        raise _unreadable("File is not a zip file")
    _s, _d, _cdd, _nd, n_total, cd_size, cd_offset, comment_len = _END_RECORD.unpack_from(data, at)
    return _zip64(read_at, _End(lo + at, comment_len, False, n_total, cd_size, cd_offset))


def _decode_extra(extra: bytes, file_size: int, compress_size: int, header_offset: int) -> tuple[int, int, int]:
    """zipfile's ZipInfo._decodeExtra: the zip64 extra field's sizes and offset where the directory
    holds 0xFFFFFFFF."""
    while len(extra) >= 4:
        tp, ln = struct.unpack("<HH", extra[:4])
        if ln + 4 > len(extra):
            raise _unreadable(f"Corrupt extra field {tp:04x} (size={ln})")
        if tp == 0x0001:
            data = extra[4 : ln + 4]
            field = ""
            try:
                if file_size in (0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF):
                    field = "File size"
                    (file_size,) = struct.unpack("<Q", data[:8])
                    data = data[8:]
                if compress_size == 0xFFFF_FFFF:
                    field = "Compress size"
                    (compress_size,) = struct.unpack("<Q", data[:8])
                    data = data[8:]
                if header_offset == 0xFFFF_FFFF:
                    field = "Header offset"
                    (header_offset,) = struct.unpack("<Q", data[:8])
            except struct.error:
                raise _unreadable(f"Corrupt zip64 extra field. {field} not found.") from None
        extra = extra[ln + 4 :]
    return file_size, compress_size, header_offset


def _central_entries(data: bytes, cd_size: int, concat: int) -> list[ZipEntry]:
    """zipfile's loop over the central directory (``data``: what reading ``cd_size`` bytes at its
    start gave, maybe fewer)."""
    entries: list[ZipEntry] = []
    append = entries.append
    unpack = _CENTRAL.unpack_from
    new = tuple.__new__
    available = len(data)
    total = 0
    while total < cd_size:
        if total + 46 > available:
            raise _unreadable("Truncated central directory")
        (sig, _cv, _cs, extract_version, _r, flags, method, _t, _d, crc, compress_size, file_size,
         name_len, extra_len, comment_len, _vol, _ia, _ea, header_offset) = unpack(data, total)  # fmt: skip
        if sig != b"PK\x01\x02":
            raise _unreadable("Bad magic number for central directory")
        at = total + 46
        raw = data[at : at + name_len]
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError as exc:
            raise _unreadable(str(exc)) from None
        if extract_version > MAX_EXTRACT_VERSION:
            raise NotImplementedError("zip file version %.1f" % (extract_version / 10))
        if "\x00" in name:
            name = name[: name.find("\x00")]
        if extra_len >= 4:
            extra = data[at + name_len : at + name_len + extra_len]
            file_size, compress_size, header_offset = _decode_extra(extra, file_size, compress_size, header_offset)
        append(new(ZipEntry, (name, raw, flags, method, crc, compress_size, file_size, header_offset + concat)))
        total += 46 + name_len + extra_len + comment_len
    return entries


def _looks_like_archive_sequence(read_at: Callable[[int, int], bytes], start: int) -> bool:
    """True when the range starts with a zip entry and the bytes just before ``start`` (where the
    last archive begins) close another archive: several archives end to end, as in ``.distcp``."""
    if read_at(0, 4) != b"PK\x03\x04" or read_at(start, 4) != b"PK\x03\x04":
        return False
    lo = max(0, start - _END_RECORD.size - _MAX_COMMENT)
    before = read_at(lo, start - lo)
    at = before.rfind(b"PK\x05\x06")
    while at >= 0:
        if at + _END_RECORD.size <= len(before):
            (comment_len,) = struct.unpack_from("<H", before, at + 20)
            if at + _END_RECORD.size + comment_len == len(before):
                return True
        at = before.rfind(b"PK\x05\x06", 0, at)
    return False


def _entry_reads(ordered: list[ZipEntry], cd_start: int) -> list[tuple[int, int]]:
    """The byte ranges that reading the archive will read: every entry's local header and data
    descriptor, and the whole of the small entries that are not storages (data.pkl, byteorder)
    where they fit before the next entry as the directory says (a ranged file fetches them all in
    one round)."""
    ranges = []
    for n, e in enumerate(ordered):
        following = ordered[n + 1].header_offset if n + 1 < len(ordered) else cd_start
        header_end = e.header_offset + _LOCAL_SIZE + len(e.orig_name.encode("utf-8")) + 64
        whole = header_end + e.compress_size
        small = "/data/" not in e.name and e.compress_size <= MAX_PICKLE_BYTES
        ranges.append((e.header_offset, min(whole, following) if small else header_end))
        if e.flags & 0x8:  # its data descriptor ends where the next entry starts
            ranges.append((max(e.header_offset, following - 24), following))
    return ranges


def _descriptor_fits(raw: bytes, compress_size: int, file_size: int) -> bool:
    """A data descriptor (after an entry written with flag bit 3): optional signature, CRC, then
    the two sizes in 4 or 8 bytes each."""
    body = raw[4:] if len(raw) in (16, 24) and raw[:4] == b"PK\x07\x08" else raw
    if len(body) == 12:
        _crc, csize, usize = _DESCRIPTOR_12.unpack(body)
    elif len(body) == 20:
        _crc, csize, usize = _DESCRIPTOR_20.unpack(body)
    else:
        return False
    return bool(csize == compress_size and usize == file_size)


def _check_entries(
    entries: list[ZipEntry],
    read_at: Callable[[int, int], bytes],
    cd_start: int,
    ranged: bool,
    source: Source,
    mapped: tuple[mmap.mmap, int, int] | None,
) -> list[int]:
    """Each entry's data offset (in directory order), after requiring that the entries fill
    ``[0, cd_start)`` one after another, each local header agreeing with the directory.
    ``mapped``: a local file's mapping, the range's start and size in it (read directly)."""
    ordered = sorted(range(len(entries)), key=lambda i: entries[i].header_offset)
    if ranged:  # a local file has nothing to prefetch: the ranges are not worked out for it
        source.will_read(_entry_reads([entries[i] for i in ordered], cd_start))
    mm, base, size = mapped if mapped is not None else (None, 0, 0)
    data_offsets = [-1] * len(entries)
    unpack = _LOCAL.unpack_from
    descriptor = _DESCRIPTOR_12.unpack_from
    position = 0
    count = len(ordered)
    for n, i in enumerate(ordered):
        e = entries[i]
        offset = e.header_offset
        if offset != position:
            if offset < position:
                raise bad_zip(f"the file is not one zip archive: zip entry {e.name[:100]!r} overlaps the one before it")
            raise bad_zip(
                f"the file is not one zip archive: {offset - position} bytes before zip entry {e.name[:100]!r} "
                "are not part of it"
            )
        raw_name = e.raw_name
        want = _LOCAL_SIZE + len(raw_name)
        if mm is not None:  # (offset <= cd_start <= size)
            raw = mm[base + offset : base + min(offset + want, size)]
        else:
            raw = read_at(offset, want)
        if len(raw) < _LOCAL_SIZE:
            raise bad_zip(f"zip entry {e.name!r} has a truncated local header")
        sig, flags, method, name_len, extra_len = unpack(raw)
        if sig != b"PK\x03\x04":
            raise bad_zip(f"zip entry {e.name!r} has no local header where the directory says")
        if name_len == len(raw_name):
            local_name = raw[_LOCAL_SIZE:]
        else:
            local_name = read_at(offset + _LOCAL_SIZE, name_len)
        if not (local_name == raw_name and (flags ^ e.flags) & 0x800 == 0 and b"\x00" not in raw_name):
            # not the same bytes decoded the same way with no NUL cut: decode and compare
            if local_name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != e.name:
                raise bad_zip(f"zip entry {e.name!r} has a different name in its local header")
        if method != e.method:
            raise bad_zip(f"zip entry {e.name!r} has a different compression in its local header")
        data = offset + _LOCAL_SIZE + name_len + extra_len
        compress_size = e.compress_size
        position = data + compress_size
        following = entries[ordered[n + 1]].header_offset if n + 1 < count else cd_start
        if position > following:
            raise bad_zip(f"zip entry {e.name[:100]!r} runs into the next entry or the directory")
        if flags & 0x8:
            gap = following - position
            if gap > 24:
                raise bad_zip(f"zip entry {e.name[:100]!r} is not followed by its data descriptor")
            tail = mm[base + position : base + following] if mm is not None else read_at(position, gap)
            if gap == 16 and tail[:4] == b"PK\x07\x08":  # torch's: signature, CRC, 4-byte sizes
                _crc, csize, usize = descriptor(tail, 4)
                fits = csize == compress_size and usize == e.file_size
            else:
                fits = _descriptor_fits(tail, compress_size, e.file_size)
            if not fits:
                raise bad_zip(f"zip entry {e.name[:100]!r} is not followed by its data descriptor")
            position = following
        data_offsets[i] = data
    if position != cd_start:
        raise bad_zip(f"the file is not one zip archive: {cd_start - position} bytes before its directory")
    return data_offsets


def read_directory(source: Source, size: int) -> tuple[list[ZipEntry], list[int]]:
    """The archive's entries in directory order and each one's data offset, after every check (see
    the module's docstring); the errors name what is wrong."""
    where = None if source.ranged else source.fileno_and_start()
    if where is None or size == 0:
        return _read_directory(source, source.read_at, size, None)
    fileno, start = where
    mm = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    try:
        return _read_directory(source, _mapped_reader(mm, start, size), size, (mm, start, size))
    finally:
        mm.close()


def _mapped_reader(mapped: mmap.mmap, start: int, size: int) -> Callable[[int, int], bytes]:
    def read_at(offset: int, n: int) -> bytes:  # as _Window.read_at: at most up to the range's end
        if offset < 0:
            raise OSError("seek before the start of the archive")
        return mapped[start + offset : start + min(offset + n, size)] if offset < size else b""

    return read_at


def _read_directory(
    source: Source, read_at: Callable[[int, int], bytes], size: int, mapped: tuple[mmap.mmap, int, int] | None
) -> tuple[list[ZipEntry], list[int]]:
    # zipfile's reading of the end records and the directory, refusing what it refuses
    end = _end_record(read_at, size)
    concat = end.location - end.cd_size - end.cd_offset
    if end.zip64:
        concat -= _ZIP64_END_RECORD.size + _ZIP64_LOCATOR.size
    start_dir = end.cd_offset + concat
    if start_dir < 0:
        raise _unreadable("Bad offset for central directory")
    directory = read_at(start_dir, end.cd_size) if start_dir < size else b""
    entries = _central_entries(directory, end.cd_size, concat)
    # then the range must be that archive and nothing else
    trailing = size - (end.location + _END_RECORD.size + end.comment_len)
    if trailing != 0:
        what = f"{trailing} bytes after the end" if trailing > 0 else "an end record whose comment runs past the end"
        raise bad_zip(f"the file is not one zip archive: {what} of the archive are not part of it")
    cd_end = end.location
    cd_size, cd_declared, declared = end.cd_size, end.cd_offset, end.entries
    locator_pos = end.location - _ZIP64_LOCATOR.size
    if locator_pos >= 0:
        locator = read_at(locator_pos, _ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _s, _d, record_declared, _disks = _ZIP64_LOCATOR.unpack(locator)
            record_pos = locator_pos - _ZIP64_END_RECORD.size
            record = read_at(record_pos, _ZIP64_END_RECORD.size) if record_pos >= 0 else b""
            if len(record) != _ZIP64_END_RECORD.size or record[:4] != b"PK\x06\x06":
                raise bad_zip("the zip64 end of central directory record is missing")
            _s, record_size, _v, _vn, _dn, _dcd, _nd, declared, cd_size, cd_declared = _ZIP64_END_RECORD.unpack(record)
            if record_size != _ZIP64_END_RECORD.size - 12:
                raise bad_zip("the zip64 end record has extensible data that is not part of the archive")
            cd_end = record_pos
            if record_declared != cd_declared + cd_size:  # the record follows the directory
                raise bad_zip("the zip64 locator does not point at the zip64 end record")
    cd_start = cd_end - cd_size
    prefix = cd_start - cd_declared
    if prefix > 0:
        if _looks_like_archive_sequence(read_at, prefix):
            raise CheckpointError("dcp_shard", DCP_SHARD_MESSAGE)
        raise bad_zip(f"the file is not one zip archive: its first {prefix} bytes are not part of the archive")
    if prefix < 0:
        raise bad_zip("the zip central directory lies outside the file")
    if declared != len(entries):
        raise bad_zip(f"the zip end record declares {declared} entries but its directory lists {len(entries)}")
    return entries, _check_entries(entries, read_at, cd_start, source.ranged, source, mapped)


def read_entry(source: Source, entry: ZipEntry) -> bytes:
    """A stored entry's bytes as ``zipfile.ZipFile.read`` gives them: its local header read again
    and checked (flag bits 5 and 6 refused, its name decoded strictly), its CRC-32 checked."""
    header = source.read_at(entry.header_offset, _LOCAL_SIZE)
    if len(header) != _LOCAL_SIZE:
        raise ZipReadError("Truncated file header")
    sig, flags, _method, name_len, extra_len = _LOCAL.unpack(header)
    if sig != b"PK\x03\x04":
        raise ZipReadError("Bad magic number for file header")
    name = source.read_at(entry.header_offset + _LOCAL_SIZE, name_len)
    if entry.flags & 0x20:
        raise ZipReadError("compressed patched data (flag bit 5)")
    if entry.flags & 0x40:
        raise ZipReadError("strong encryption (flag bit 6)")
    if name.decode("utf-8" if flags & 0x800 else "cp437") != entry.orig_name:  # a ValueError when undecodable
        raise ZipReadError(f"File name in directory {entry.orig_name!r} and header {name!r} differ.")
    data = source.read_at(entry.header_offset + _LOCAL_SIZE + name_len + extra_len, entry.compress_size)
    if len(data) < entry.compress_size:
        raise ZipReadError("the entry ended early")  # zipfile: EOFError
    if zlib.crc32(data) != entry.crc:
        raise ZipReadError(f"Bad CRC-32 for file {entry.name!r}")
    return data
