"""The listing's hot paths keep every check: the pickle machine's own loop (the stream's reads
until a FRAME, the unframer after it), its memo bound on every kind of put, its count of memoised
globals; the safetensors reader's per-(dtype, shape) layouts; the torch-zip listing of many
tensors against torch's own load."""

from __future__ import annotations

import collections
import json
import pickle
import pickletools
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint, pickle_graph
from ckptscope.formats.pickle_graph import Census, Global, WorkBudget, unpickle_graph


def _graph(data: bytes, census: Census | None = None) -> object:
    return unpickle_graph(data, WorkBudget.for_bytes(len(data)), lambda _m, _n: None, census)


PLAIN = {
    "name": "w",
    "shape": (3, 4),
    "nested": [{"a": 1, "b": [1.5, None, True]}, ("x", "é raw", -7, 2**70)],
    "long": ["s" * 300, list(range(300))],
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_reads_as_itself_in_every_protocol(protocol):
    data = pickle.dumps(PLAIN, protocol=protocol)
    framed = any(op.name == "FRAME" for op, _, _ in pickletools.genops(data))
    assert framed == (protocol >= 4)  # frames are exercised where they exist
    assert _graph(data) == PLAIN


def test_a_frame_that_claims_more_than_the_pickle_holds_is_malformed():
    data = bytearray(pickle.dumps(PLAIN, protocol=4))
    at = data.index(pickle.FRAME)
    (size,) = struct.unpack_from("<Q", data, at + 1)
    struct.pack_into("<Q", data, at + 1, size - 5)  # the frame ends inside an opcode's argument
    with pytest.raises(CheckpointError) as caught:
        _graph(bytes(data))
    assert caught.value.code == "corrupt_pickle"


@pytest.mark.parametrize("protocol", [0, 2, 4])  # PUT, BINPUT and LONG_BINPUT, MEMOIZE
def test_the_memo_stays_within_its_bound_for_every_kind_of_put(monkeypatch, protocol):
    values = [f"value {i}" for i in range(300)]  # distinct strings: each is memoised
    data = pickle.dumps(values, protocol=protocol)
    assert len(_graph(data)) == 300  # type: ignore[arg-type]
    monkeypatch.setattr(pickle_graph, "MAX_MEMO", 100)
    with pytest.raises(CheckpointError) as caught:
        _graph(data)
    assert caught.value.code == "limit_exceeded"


def test_a_memo_index_never_put_is_malformed():
    data = pickle.PROTO + b"\x02" + pickle.BINGET + b"\x07" + pickle.STOP
    with pytest.raises(CheckpointError) as caught:
        _graph(data)
    assert caught.value.code == "corrupt_pickle"


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_global_used_again_through_the_memo_is_counted_each_time(protocol):
    data = pickle.dumps([collections.OrderedDict, collections.OrderedDict, collections.OrderedDict], protocol)
    census = Census()
    graph = _graph(data, census)
    assert [type(g) for g in graph] == [Global] * 3  # type: ignore[attr-defined]
    assert census.counts == {("collections", "OrderedDict"): 3}


def _header_edit(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_safetensors_layouts_keep_each_entry_checked(tmp_path):
    tensors = {
        "a.weight": torch.zeros(2, 3),
        "b.weight": torch.zeros(2, 3, dtype=torch.float16),  # the same shape, another dtype
        "c.weight": torch.zeros(2, 3),
        "d.num_batches_tracked": torch.zeros((), dtype=torch.int64),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    listed = {t.name: t for t in open_checkpoint(path).tensors}
    assert [(listed[n].dtype, listed[n].shape, listed[n].stride, listed[n].storage.nbytes) for n in tensors] == [
        ("float32", (2, 3), (3, 1), 24),
        ("float16", (2, 3), (3, 1), 12),
        ("float32", (2, 3), (3, 1), 24),
        ("int64", (), (), 8),
    ]
    assert listed["a.weight"].kind == "parameter" and listed["d.num_batches_tracked"].kind == "buffer"
    assert listed["a.weight"].encoding is None and listed["a.weight"].pieces == () and listed["a.weight"].plain

    def bool_dimension(header: dict) -> None:  # [true, 3] would equal [1, 3] as a dict key
        header["c.weight"]["shape"] = [True, 3]

    _header_edit(path, bool_dimension)
    with pytest.raises(CheckpointError, match="non-integer dimension") as caught:
        open_checkpoint(path)
    assert caught.value.code == "corrupt_safetensors"


def test_safetensors_entry_whose_bytes_do_not_match_a_known_layout_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, str(path))

    def wrong_dtype(header: dict) -> None:  # b's 24 bytes now claim to be six float64s
        header["b"]["dtype"] = "F64"

    _header_edit(path, wrong_dtype)
    with pytest.raises(CheckpointError, match="does not match its 24 bytes"):
        open_checkpoint(path)


def test_torch_zip_of_many_tensors_lists_what_torch_loads(tmp_path):
    state = {f"blocks.{i // 10}.unit{i % 10}.weight": torch.zeros(2, 1 + i % 5) for i in range(2000)}
    state["blocks.0.unit0.bias"] = state["blocks.0.unit0.weight"][1]  # a view sharing a storage
    path = tmp_path / "m.pt"
    torch.save(state, path)
    listed = open_checkpoint(path).tensors
    loaded = torch.load(path, mmap=True, weights_only=True)
    assert [t.name for t in listed] == list(loaded)
    assert [(t.shape, t.stride, t.storage_offset) for t in listed] == [
        (tuple(v.shape), v.stride(), v.storage_offset()) for v in loaded.values()
    ]
    assert listed[-1].alias_of is None and listed[-1].storage.key == listed[0].storage.key
