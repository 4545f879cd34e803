"""A torch zip is read only when every byte of the file belongs to the one archive: a lone DCP
shard (many torch.save archives end to end) and files with bytes before, between or after the
archive's parts are refused; real torch.save files of every kind still read."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import StorageRef, TensorInfo
from ckptscope.formats.torch_zip import open_torch_archive, read_torch_zip
from ckptscope.formats.writers import OutputTensor, write_torch_zip
from tests import factories as f


def refused(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    return info.value


def entries_of(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assert_reads_like_torch(path: Path) -> None:
    """Every tensor torch.load finds is listed, with its values at the listed byte range."""
    loaded = torch.load(path, weights_only=True)
    flat = loaded if isinstance(loaded, dict) else {"tensor": loaded}
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-zip"
    listed = {t.name: t for t in ckpt.tensors}
    data = path.read_bytes()
    for name, value in _leaves(flat):
        t = listed[name]
        assert (t.dtype, t.shape) == (str(value.dtype).removeprefix("torch."), tuple(value.shape)), name
        if value.numel() and t.stride == value.contiguous().stride():
            raw = data[t.data_offset : t.data_offset + t.nbytes]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                got = torch.frombuffer(bytearray(raw), dtype=value.dtype).reshape(value.shape)
            assert torch.equal(got, value), name


def _leaves(obj: object, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return []


# --- real files read ---------------------------------------------------------------------------


def test_real_torch_save_files_of_all_kinds_read(tmp_path):
    torch.manual_seed(0)
    cases = {
        "state_dict": f.cnn_state_dict(),
        "tied": f.TinyTransformer(layers=1).state_dict(),
        "dtypes": {
            "bf16": torch.randn(5, 3).to(torch.bfloat16),
            "f16": torch.randn(7).half(),
            "i8": torch.arange(-4, 4, dtype=torch.int8),
            "bool": torch.tensor([True, False, True]),
            "f64": torch.randn(2, 2, dtype=torch.float64),
        },
        "empty_and_scalar": {"empty": torch.empty(0, 3), "scalar": torch.tensor(3.5), "one": torch.ones(1)},
        "views": {"t": torch.randn(4, 6).t(), "slice": torch.randn(10)[3:7]},
        "lone_tensor": torch.randn(3, 3),
        "nested": {"model": {"w": torch.randn(2)}, "optim": {"state": {0: {"exp_avg": torch.zeros(2)}}}, "step": 3},
    }
    for name, obj in cases.items():
        path = f.save_torch(obj, tmp_path / f"{name}.pt")
        assert_reads_like_torch(path)
    big = f.save_torch({"w": torch.randn(300, 1000)}, tmp_path / "big.pt")  # 1.2 MB storage
    assert_reads_like_torch(big)
    module = nn.Linear(3, 2)
    with_params = f.save_torch({"p": module.weight, "b": module.bias}, tmp_path / "params.pt")
    assert_reads_like_torch(with_params)


def test_files_written_by_python_zipfile_and_by_our_writer_read(tmp_path):
    sd = f.cnn_state_dict()
    src = f.save_torch(sd, tmp_path / "a.pt")
    rewritten = f.relocate_to_cuda(src, tmp_path / "cuda.pt")  # Python's zipfile: no data descriptors
    assert {t.name for t in open_checkpoint(rewritten).tensors} == set(sd)
    ckpt = open_checkpoint(src)
    out = tmp_path / "ours.pt"
    write_torch_zip(out, [OutputTensor(t.name, t) for t in ckpt.tensors], {"ckptscope.note": "x"})
    assert open_checkpoint(out).metadata["ckptscope.note"] == "x"
    assert_reads_like_torch(out)


def test_an_archive_comment_is_part_of_the_archive(tmp_path):
    path = f.save_torch({"w": torch.ones(3)}, tmp_path / "a.pt")
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"written by a tool that comments its zips"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [t.name for t in open_checkpoint(path).tensors] == ["w"]


def test_an_archive_inside_a_byte_range_reads_with_absolute_offsets(tmp_path):
    first, second = saved({"a": torch.arange(4.0)}), saved({"b": torch.arange(6.0) * 2})
    path = tmp_path / "two.bin"
    path.write_bytes(first + second)
    with open_torch_archive(path, len(first), len(second), key_prefix="@x/") as archive:
        ref = archive.locate(archive.obj["b"].storage)
    assert ref.path == str(path) and ref.key == "@x/0" and ref.nbytes == 24
    raw = path.read_bytes()[ref.offset : ref.offset + ref.nbytes]
    assert struct.unpack("<6f", raw) == tuple(float(2 * i) for i in range(6))
    with pytest.raises(CheckpointError) as info:  # the range of the first archive plus one byte
        with open_torch_archive(path, 0, len(first) + 1):
            pass
    assert info.value.code == "corrupt_zip"


# --- bytes that are not part of the archive ----------------------------------------------------


def test_a_lone_dcp_shard_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"model": f.cnn_state_dict()}, checkpoint_id=tmp_path / "ck")
    shard = tmp_path / "ck" / "__0_0.distcp"
    assert zipfile.ZipFile(shard).namelist()  # Python's zipfile sees one archive (the last one)
    err = refused(shard)
    assert err.code == "dcp_shard"
    assert ".distcp" in err.message and ".metadata" in err.message


def test_two_torch_saves_end_to_end_are_refused_as_a_shard(tmp_path):
    path = tmp_path / "concat.pt"
    path.write_bytes(saved({"a": torch.ones(2)}) + saved({"b": torch.zeros(3)}))
    assert refused(path).code == "dcp_shard"


def test_bytes_before_the_archive_are_refused(tmp_path):
    good = saved({"w": torch.ones(4)})
    path = tmp_path / "prefixed.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 60 + good)  # looks like a zip, is not one archive
    err = refused(path)
    assert err.code == "corrupt_zip" and "64 bytes" in err.message and "not part of the archive" in err.message


def test_bytes_after_the_archive_are_refused(tmp_path):
    path = tmp_path / "trailing.pt"
    path.write_bytes(saved({"w": torch.ones(4)}) + b"hidden payload")
    err = refused(path)
    assert err.code == "corrupt_zip" and "14 bytes after the end" in err.message


def _junk(zf: zipfile.ZipFile) -> None:
    """32 bytes where zipfile would write next (it writes each part at ``start_dir``)."""
    assert zf.fp is not None
    zf.fp.seek(zf.start_dir)
    zf.fp.write(b"JUNK" * 8)
    zf.start_dir = zf.fp.tell()


def _zip_with_gap(where: str) -> bytes:
    entries = entries_of(saved({"w": torch.arange(4.0)}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i, (name, data) in enumerate(entries):
            if where == "between" and i == 1:
                _junk(zf)
            zf.writestr(zipfile.ZipInfo(name), data)
        if where == "before_directory":
            _junk(zf)
    data = buf.getvalue()
    assert (b"JUNK" * 8 in data) == (where != "none")
    return data


@pytest.mark.parametrize("where", ["between", "before_directory"])
def test_unexplained_gaps_inside_the_archive_are_refused(tmp_path, where):
    data = _zip_with_gap(where)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # Python's zipfile reads it without a word
        assert zf.testzip() is None
    path = tmp_path / f"{where}.pt"
    path.write_bytes(data)
    err = refused(path)
    assert err.code == "corrupt_zip" and "32 bytes" in err.message and "not one zip archive" in err.message
    clean = tmp_path / "clean.pt"
    clean.write_bytes(_zip_with_gap("none"))
    assert [t.name for t in open_checkpoint(clean).tensors] == ["w"]  # the same archive without the gap


def test_a_damaged_data_descriptor_is_refused(tmp_path):
    data = bytearray(saved({"w": torch.arange(4.0)}))
    at = data.find(b"PK\x07\x08")  # torch writes a descriptor after each entry
    assert at > 0
    data[at + 8 : at + 12] = struct.pack("<I", 999)  # its compressed size
    path = tmp_path / "descriptor.pt"
    path.write_bytes(bytes(data))
    err = refused(path)
    assert err.code == "corrupt_zip" and "data descriptor" in err.message


def test_an_end_record_that_miscounts_the_entries_is_refused(tmp_path):
    data = bytearray(saved({"w": torch.arange(4.0)}))
    end = data.rfind(b"PK\x05\x06")
    zip64 = data.rfind(b"PK\x06\x06")
    assert zip64 > 0  # torch always writes the zip64 end record
    data[zip64 + 32 : zip64 + 40] = struct.pack("<Q", 99)  # total entries
    path = tmp_path / "count.pt"
    path.write_bytes(bytes(data))
    err = refused(path)
    assert err.code == "corrupt_zip" and "declares 99 entries" in err.message
    assert end > zip64


def test_a_shard_refusal_lists_nothing(tmp_path):
    """The last archive of a shard is a valid torch.save on its own: it is never listed."""
    second = saved({"secret": torch.full((3,), 7.0)})
    path = tmp_path / "x.pt"
    path.write_bytes(saved({"a": torch.ones(1)}) + second)
    with pytest.raises(CheckpointError):
        read_torch_zip(path)
    alone = tmp_path / "alone.pt"
    alone.write_bytes(second)
    assert isinstance(read_torch_zip(alone).tensors[0], TensorInfo)
    assert isinstance(read_torch_zip(alone).tensors[0].storage, StorageRef)
