"""The struct-based zip directory reader (formats/zip_directory.py) that replaced zipfile.ZipFile in
the torch-zip listing: real torch.save files read as zipfile reads them, and hostile variants
refused with the same errors as before."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint
from ckptscope.formats.torch_zip import _Window, open_torch_archive
from ckptscope.formats.zip_directory import _decode_extra, read_directory


def _saved(n: int = 5) -> bytes:
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(3, 4 + i, generator=gen) for i in range(n)}
    state["bn.num_batches_tracked"] = torch.tensor(7)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _refusal(tmp_path: Path, data: bytes) -> CheckpointError:
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    return caught.value


def _directory(data: bytes) -> tuple[list, list[int]]:
    with io.BytesIO(data) as raw:
        return read_directory(_Window(raw, 0, len(data)), len(data))  # type: ignore[arg-type]


def test_entries_and_data_offsets_are_zipfiles(tmp_path):
    data = _saved(40)
    entries, offsets = _directory(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    assert [e.name for e in entries] == [i.filename for i in infos]
    assert [(e.header_offset, e.compress_size, e.file_size, e.crc, e.flags) for e in entries] == [
        (i.header_offset, i.compress_size, i.file_size, i.CRC, i.flag_bits) for i in infos
    ]
    for info, offset in zip(infos, offsets, strict=True):  # each data offset holds the entry's bytes
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert data[offset : offset + info.file_size] == zf.read(info)
    # the mapped read (a local file) gives the same as the windowed one
    path = tmp_path / "ok.pt"
    path.write_bytes(data)
    with path.open("rb") as raw:
        mapped = read_directory(_Window(raw, 0, len(data)), len(data))
    assert mapped == (entries, offsets)


def test_listing_matches_torch(tmp_path):
    data = _saved(30)
    path = tmp_path / "ok.pt"
    path.write_bytes(data)
    ckpt = open_checkpoint(path)
    state = torch.load(path, weights_only=True, mmap=True)
    assert [t.name for t in ckpt.tensors] == list(state)
    raw = path.read_bytes()
    for t in ckpt.tensors:
        value = state[t.name]
        assert list(t.shape) == list(value.shape) and t.dtype == str(value.dtype).removeprefix("torch.")
        expect = value.contiguous().numpy().tobytes()
        assert raw[t.data_offset : t.data_offset + t.nbytes] == expect


def _central(data: bytes, name: bytes) -> int:
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        (n,) = struct.unpack_from("<H", data, at + 28)
        if data[at + 46 : at + 46 + n] == name:
            return at
        at = data.find(b"PK\x01\x02", at + 4)
    raise AssertionError(name)


def _local(data: bytes, name: bytes) -> int:
    (offset,) = struct.unpack_from("<I", data, _central(data, name) + 42)
    return offset


def _prefix(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()[0].split("/")[0].encode()


def test_truncated_central_directory(tmp_path):
    data = _saved()
    end = data.rfind(b"PK\x05\x06")
    zip64 = data.rfind(b"PK\x06\x06")
    cd_size_field = zip64 + 40
    bad = bytearray(data)
    (cd_size,) = struct.unpack_from("<Q", bad, cd_size_field)
    # the directory claims 10 more bytes than there are before the zip64 record
    bad[cd_size_field : cd_size_field + 8] = struct.pack("<Q", cd_size + 10)
    err = _refusal(tmp_path, bytes(bad))
    assert err.code == "corrupt_zip"
    cut = data[: end - 30]  # the end records cut short
    assert _refusal(tmp_path, cut).code == "corrupt_zip"
    # the directory's last entry cut in the middle of its fixed fields
    last = data.rfind(b"PK\x01\x02")
    short = bytearray(data)
    short[last : last + 4] = b"XX\x01\x02"
    err = _refusal(tmp_path, bytes(short))
    assert err.code == "corrupt_zip" and "Bad magic number for central directory" in err.message


def test_overlapping_entries(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/data/1"
    at = _central(data, name)
    (offset,) = struct.unpack_from("<I", data, at + 42)
    (previous,) = struct.unpack_from("<I", data, _central(data, _prefix(data) + b"/data/0") + 42)
    data[at + 42 : at + 46] = struct.pack("<I", previous)  # two directory entries, one local header
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip"
    assert offset != previous
    assert "archive/data/0' runs into the next entry or the directory" in err.message
    inside = bytearray(data)  # the second entry's header inside the first one's bytes
    inside[at + 42 : at + 46] = struct.pack("<I", previous + 40)
    err = _refusal(tmp_path, bytes(inside))
    assert err.code == "corrupt_zip" and "runs into the next entry" in err.message


def test_entry_offset_past_the_end(tmp_path):
    data = bytearray(_saved())
    at = _central(data, _prefix(data) + b"/data/2")
    data[at + 42 : at + 46] = struct.pack("<I", len(data) + 1000)
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "archive/data/1' is not followed by its data descriptor" in err.message


def test_entry_size_past_the_next_entry(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/data/0"
    at = _central(data, name)
    (size,) = struct.unpack_from("<I", data, at + 20)
    data[at + 20 : at + 28] = struct.pack("<II", size + 4096, size + 4096)
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "runs into the next entry or the directory" in err.message


def test_zip64_records(tmp_path):
    data = _saved()
    zip64 = data.rfind(b"PK\x06\x06")
    assert zip64 > 0  # torch always writes one
    missing = bytearray(data)
    missing[zip64 : zip64 + 4] = b"PK\x00\x00"
    err = _refusal(tmp_path, bytes(missing))  # zipfile's rule: the end record's values, which miss
    assert err.code == "corrupt_zip" and "Bad magic number for central directory" in err.message
    locator = data.rfind(b"PK\x06\x07")
    pointed = bytearray(data)
    pointed[locator + 8 : locator + 16] = struct.pack("<Q", 12345)
    err = _refusal(tmp_path, bytes(pointed))
    assert err.code == "corrupt_zip" and "locator does not point" in err.message
    disks = bytearray(data)
    disks[locator + 16 : locator + 20] = struct.pack("<I", 2)
    err = _refusal(tmp_path, bytes(disks))
    assert err.code == "corrupt_zip" and "span multiple disks" in err.message
    extensible = bytearray(data)
    extensible[zip64 + 4 : zip64 + 12] = struct.pack("<Q", 60)
    err = _refusal(tmp_path, bytes(extensible))
    assert err.code == "corrupt_zip" and "extensible data" in err.message


def test_zip64_extra_field_sizes():
    """Sizes and offset of 0xFFFFFFFF in the directory come from the zip64 extra field, as zipfile
    reads them; an extra field too short for them, or cut, is refused in zipfile's words."""
    full = struct.pack("<HHQQQ", 1, 24, 5 << 32, 5 << 32, 7 << 32)
    assert _decode_extra(full, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF) == (5 << 32, 5 << 32, 7 << 32)
    assert _decode_extra(full, 10, 10, 20) == (10, 10, 20)  # only the fields that say so
    with pytest.raises(CheckpointError, match="Corrupt zip64 extra field. Compress size not found"):
        _decode_extra(struct.pack("<HHQ", 1, 8, 5), 0xFFFFFFFF, 0xFFFFFFFF, 0)
    with pytest.raises(CheckpointError, match="Corrupt extra field 0001"):
        _decode_extra(struct.pack("<HH", 1, 30) + bytes(8), 0, 0, 0)


def test_names_with_dot_dot_are_names_only(tmp_path):
    """A name with ../ is matched as a name (nothing is ever written from it): a storage entry named
    so is simply not the storage, and the file is refused for the missing entry."""
    data = bytearray(_saved())
    prefix = _prefix(data)
    name = prefix + b"/data/0"
    evil = (b"../" + prefix[3:] + b"/data/0") if len(prefix) > 3 else None
    assert evil is not None and len(evil) == len(name)
    for at in (_central(data, name) + 46, _local(data, name) + 30):
        data[at : at + len(name)] = evil
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "has no data entry" in err.message


def test_local_name_differs(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/data/3"
    at = _local(data, name) + 30
    data[at + len(name) - 1] = ord("9")
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "different name in its local header" in err.message


def test_compressed_entries(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/data/1"
    central = _central(data, name)
    data[central + 10 : central + 12] = struct.pack("<H", 8)  # the directory says deflated
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "different compression in its local header" in err.message
    local = _local(data, name)
    data[local + 8 : local + 10] = struct.pack("<H", 8)  # and the local header agrees
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "is compressed" in err.message


def test_broken_data_descriptor(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/data/2"
    central = _central(data, name)
    (size,) = struct.unpack_from("<I", data, central + 24)
    local = _local(data, name)
    (name_len, extra_len) = struct.unpack_from("<HH", data, local + 26)
    descriptor = local + 30 + name_len + extra_len + size
    assert data[descriptor : descriptor + 4] == b"PK\x07\x08"
    data[descriptor + 8 : descriptor + 12] = struct.pack("<I", size + 1)
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip" and "data descriptor" in err.message


def test_byteorder_crc_is_checked(tmp_path):
    data = bytearray(_saved())
    name = _prefix(data) + b"/byteorder"
    central = _central(data, name)
    data[central + 16 : central + 20] = struct.pack("<I", 1234)  # zipfile's read checked it
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "corrupt_zip"


def test_bytes_after_and_before_the_archive(tmp_path):
    data = _saved()
    err = _refusal(tmp_path, data + b"x" * 14)
    assert err.code == "corrupt_zip"
    path = tmp_path / "two.bin"
    path.write_bytes(b"\x00" * 64 + data)
    with pytest.raises(CheckpointError) as caught, open_torch_archive(path, 0, 64 + len(data)):
        pass
    assert caught.value.code == "corrupt_zip" and "first 64 bytes" in caught.value.message
    with open_torch_archive(path, 64, len(data)) as archive:  # the range that is the archive reads
        assert archive.obj
