"""The state-dict fast path (``torch_save_pattern``) lists exactly what the general pickle path
lists for real ``torch.save`` outputs, runs for a plain state dict, and for damaged pickles either
gives the general path's answer or declines (the general path then gives its answer or error)."""

from __future__ import annotations

import collections
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint, torch_save_pattern, torch_zip
from ckptscope.formats.pickle_globals import dangerous
from ckptscope.formats.pickle_graph import WorkBudget
from ckptscope.formats.torch_pickle import PickleReader
from ckptscope.formats.torch_save_pattern import read_state_dict_pickle


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _general(data: bytes) -> tuple[Any, Any, Any] | tuple[str, str]:
    """The general path's reading of a data.pkl: (value, storages, report), or its error."""
    reader = PickleReader(WorkBudget.for_bytes(len(data)))
    try:
        value, storages = reader.load(data)
    except CheckpointError as error:
        return (error.code, error.message)
    return value, storages, reader.report()


def _listing(path: Path, monkeypatch: pytest.MonkeyPatch, fast: bool) -> Any:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(torch_zip, "read_state_dict_pickle", lambda _data: None)
        try:
            return open_checkpoint(path)
        except CheckpointError as error:
            return (error.code, error.message)


def _save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _producers(tmp: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.int64, torch.float64]
    mixed = {f"t.{i}.{str(d)[6:]}": torch.zeros(3, 1 + i % 4, dtype=d) for i, d in enumerate(dtypes * 3)}
    float8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d]
    with_float8 = {**mixed, **{f"f8.{i}": torch.zeros(2, 3, dtype=d) for i, d in enumerate(float8)}}
    views = {
        "base": base,
        "transposed": base.t(),
        "sliced": base[2:5, 1:7:2],
        "row": base[3],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "empty_view": base[6:],
        "shared_again": base.view(-1),
    }
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    big = {f"layers.{i}.w": torch.zeros(2, 1 + i % 3) for i in range(700)}  # past 255 memo indices, batches
    big["layers.0.alias"] = big["layers.3.w"]  # one tensor under two names: a memo get of it
    nested = {
        "model": collections.OrderedDict((f"l{i}.weight", torch.zeros(4, 4)) for i in range(300)),
        "ema": {"inner": {"l0.weight": torch.ones(2)}, "l1.weight": torch.ones(3)},
    }
    files = {
        "plain": _save({k: v for k, v in big.items() if k != "layers.0.alias"}, tmp / "plain.pt"),
        "big_alias": _save(big, tmp / "big_alias.pt"),
        "ordered": _save(collections.OrderedDict(big), tmp / "ordered.pt"),
        "mixed_dtypes": _save(mixed, tmp / "mixed.pt"),
        "float8": _save(with_float8, tmp / "float8.pt"),  # _rebuild_tensor_v3: the general path reads it
        "views": _save(views, tmp / "views.pt"),
        "views_p2": _save(views, tmp / "views_p2.pt", pickle_protocol=2),
        "views_p4": _save(views, tmp / "views_p4.pt", pickle_protocol=4),
        "module_state_dict": _save(model.state_dict(), tmp / "module.pt"),
        "module_state_dict_copy": _save(dict(model.state_dict()), tmp / "module_copy.pt"),
        "nested": _save(nested, tmp / "nested.pt"),
        "one": _save({"x": torch.zeros(())}, tmp / "one.pt"),
        "empty": _save({}, tmp / "empty.pt"),
        "with_values": _save({"w": torch.zeros(2), "epoch": 3}, tmp / "values.pt"),
        "parameters": _save({"p": torch.nn.Parameter(torch.zeros(2))}, tmp / "param.pt"),
        "tensor_alone": _save(torch.zeros(3), tmp / "alone.pt"),
        # the storage class's memo ref changes at every tensor: more run patterns than are compiled
        "alternating": _save(
            {f"a{i}": torch.zeros(2, 2, dtype=(torch.float16, torch.float32, torch.int8)[i % 3]) for i in range(600)},
            tmp / "alternating.pt",
        ),
        "long_names": _save({"é" * 200 + str(i): torch.zeros(1) for i in range(40)}, tmp / "names.pt"),
    }
    return files


@pytest.fixture(scope="module")
def producer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _producers(tmp_path_factory.mktemp("producers"))


def _transformers_file(tmp: Path) -> Path | None:
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != "4.57.6":
        return None
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertForMaskedLM(config)  # tied input/output embeddings
    model.save_pretrained(tmp, safe_serialization=False)
    return tmp / "pytorch_model.bin"


def test_the_three_globals_it_accepts_are_not_dangerous():
    for module, name in (
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        *(ref.key for ref in torch_save_pattern._STORAGE_REFS.values()),
    ):
        assert dangerous(module, name) is None


@pytest.mark.parametrize(
    "name",
    [
        "plain", "big_alias", "ordered", "mixed_dtypes", "float8", "views", "views_p2", "views_p4", "module_state_dict",
        "module_state_dict_copy", "nested", "one", "empty", "with_values", "parameters", "tensor_alone",
        "long_names", "alternating",
    ],
)  # fmt: skip
def test_fast_path_lists_exactly_what_the_general_path_lists(producer_files, monkeypatch, name):
    path = producer_files[name]
    data = _data_pkl(path)
    fast = read_state_dict_pickle(data)
    general = _general(data)
    if fast is not None:
        assert len(general) == 3
        value, storages, report = torch_zip._state_dict_pattern(data)  # type: ignore[misc]
        assert (value, storages, report) == general
        assert list(storages) == list(general[1])
    assert _listing(path, monkeypatch, fast=True) == _listing(path, monkeypatch, fast=False)


EXPECTED_FAST = ["plain", "big_alias", "ordered", "mixed_dtypes", "views", "views_p2", "module_state_dict_copy"]
EXPECTED_FAST += ["nested", "one", "empty", "long_names", "module_state_dict", "alternating"]


@pytest.mark.parametrize("name", EXPECTED_FAST)
def test_fast_path_runs_for_plain_state_dicts(producer_files, monkeypatch, name):
    ran = []
    real = torch_zip.read_state_dict_pickle

    def spy(data: bytes) -> Any:
        result = real(data)
        ran.append(result is not None)
        return result

    monkeypatch.setattr(torch_zip, "read_state_dict_pickle", spy)
    listing = open_checkpoint(producer_files[name]) if name != "empty" else None
    if name == "empty":
        with pytest.raises(CheckpointError):
            open_checkpoint(producer_files[name])
    assert ran == [True]
    if listing is not None:
        loaded = torch.load(producer_files[name], weights_only=True, mmap=True)
        flat: dict[str, torch.Tensor] = {}

        def flatten(prefix: str, node: Any) -> None:
            for k, v in node.items():
                if isinstance(v, dict):
                    flatten(f"{prefix}{k}.", v)
                else:
                    flat[prefix + k] = v

        flatten("", loaded)
        assert [t.name for t in listing.tensors] == list(flat)
        assert [(t.shape, t.stride, t.storage_offset, t.dtype) for t in listing.tensors] == [
            (tuple(v.shape), v.stride(), v.storage_offset(), str(v.dtype)[6:]) for v in flat.values()
        ]


def test_transformers_pytorch_model_bin(tmp_path, monkeypatch):
    path = _transformers_file(tmp_path)
    if path is None:
        pytest.skip("transformers 4.57.6 is not installed")
    data = _data_pkl(path)
    fast = read_state_dict_pickle(data)
    assert fast is not None  # a plain dict of tensors: the fast path reads it
    assert torch_zip._state_dict_pattern(data) == _general(data)
    assert _listing(path, monkeypatch, fast=True) == _listing(path, monkeypatch, fast=False)


def _small_state_dict(kind: str = "ordered") -> bytes:
    base = torch.zeros(4, 6)
    state: Any = collections.OrderedDict()
    state["a.weight"] = base
    state["a.bias"] = base[1]
    state["b.weight"] = torch.zeros(3, 2, dtype=torch.float16).t()
    state["b.scalar"] = torch.tensor(2)
    if kind == "module":  # an OrderedDict with _metadata (BUILD), ints in it
        state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).state_dict()
    elif kind == "nested":  # a plain dict, a nested one, an int value
        state = {"model": {"w": base, "v": base[2:]}, "step": 7, "ema": {"w": torch.ones(2, dtype=torch.bfloat16)}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _check_agrees(data: bytes) -> bool:
    """The fast path's answer for ``data`` is the general path's, or None; True when it answered."""
    fast = torch_zip._state_dict_pattern(data)  # must never raise
    if fast is None:
        return False
    assert fast == _general(data)
    return True


@pytest.mark.parametrize("kind", ["ordered", "module", "nested"])
def test_damaged_pickles_give_the_general_answer_or_decline(kind):
    data = _small_state_dict(kind)
    assert _check_agrees(data)
    answered = 0
    for at in range(len(data)):
        for change in (0x01, 0x80, 0xFF, 0x10):
            damaged = bytearray(data)
            damaged[at] ^= change
            answered += _check_agrees(bytes(damaged))
        for opcode in (b"q", b"h", b"j", b"r", b"K", b"M", b"J", b"u", b"s", b"(", b".", b")", b"\x85", b"\x89"):
            damaged = bytearray(data)
            damaged[at : at + 1] = opcode
            answered += _check_agrees(bytes(damaged))
        assert not _check_agrees(data[:at])  # truncated: the general path refuses, the fast one declines
        answered += _check_agrees(data[:at] + data[at + 1 :])  # one byte removed
    assert answered > 0  # some damage keeps the pattern (a changed digit of a shape, a name's letter)


def test_memo_gets_must_name_what_the_pattern_expects():
    data = _small_state_dict()
    index = data.index(b"h\x00")  # the hooks' OrderedDict, got from the memo
    for other in range(0, 40):  # every other memo index, also indices never put and the tensors'
        damaged = data[:index] + b"h" + bytes([other]) + data[index + 2 :]
        _check_agrees(damaged)
    for wide in (b"j\x00\x00\x00\x00", b"j\x00\x00\x00\x01"):  # the same index, another width; a huge one
        damaged = data[:index] + wide + data[index + 2 :]
        assert torch_zip._state_dict_pattern(damaged) is None


def test_puts_out_of_sequence_decline():
    data = _small_state_dict()
    index = data.index(b"q\x05")
    for other in (4, 6, 0, 200):
        damaged = data[:index] + b"q" + bytes([other]) + data[index + 2 :]
        assert torch_zip._state_dict_pattern(damaged) is None
        _check_agrees(damaged)


def test_a_storage_declared_twice_differently_is_the_general_paths_refusal(tmp_path, monkeypatch):
    data = _small_state_dict()
    # a.bias shares storage "0" (24 elements); make its persistent id declare 25
    first = data.index(b"K\x18t")
    second = data.index(b"K\x18t", first + 1)
    damaged = data[:second] + b"K\x19t" + data[second + 3 :]
    assert torch_zip._state_dict_pattern(damaged) is None
    assert _general(damaged)[0] == "corrupt_pickle"


def test_a_view_past_its_storage_is_refused_after_one_of_the_same_shape_that_fits(tmp_path, monkeypatch):
    path = _save({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, tmp_path / "m.pt")
    raw = bytearray(path.read_bytes())
    pkl = _data_pkl(path)
    start = raw.index(pkl)
    offset = pkl.index(b"QK\x00", pkl.index(b"QK\x00") + 1)  # b's storage offset
    raw[start + offset + 2] = 1  # b now views one element past its storage's end
    path.write_bytes(bytes(raw))
    for fast in (True, False):
        code, message = _listing(path, monkeypatch, fast=fast)
        assert code == "corrupt_pickle" and "'b' views elements beyond the end" in message


def test_damaged_long_runs_give_the_general_answer_or_decline():
    """Past memo index 255 (LONG_BINPUT/LONG_BINGET), where whole entries match the run pattern."""
    base = torch.zeros(8, 8)
    state = {f"layers.{i}.weight": torch.zeros(2, 1 + i % 3) for i in range(60)}
    state["layers.shared"] = base
    state["layers.shared_row"] = base[3]
    state["layers.again"] = state["layers.5.weight"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(buffer) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(name)
    assert b"r\x00\x01\x00\x00" in data and _check_agrees(data)
    start = data.index(b"r\x00\x01\x00\x00")
    answered = 0
    for at in range(start, len(data), 3):
        for change in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[at] ^= change
            answered += _check_agrees(bytes(damaged))
        for opcode in (b"j", b"r", b"M", b"u", b"s"):
            damaged = bytearray(data)
            damaged[at : at + 1] = opcode
            answered += _check_agrees(bytes(damaged))
    assert answered > 0


def test_damaged_files_list_or_fail_alike_on_both_paths(tmp_path, monkeypatch):
    """The whole listing (tensors, roots, report) or the error, with data.pkl damaged in place."""
    path = _save({"a": torch.zeros(4, 6), "b": torch.zeros(3, 2, dtype=torch.float16).t()}, tmp_path / "m.pt")
    raw = path.read_bytes()
    pkl = _data_pkl(path)
    start = raw.index(pkl)
    damaged_path = tmp_path / "damaged.pt"
    answered = 0
    for at in range(len(pkl)):
        for change in (0x01, 0x04):
            damaged = bytearray(raw)
            damaged[start + at] ^= change
            damaged_path.write_bytes(bytes(damaged))
            fast = _listing(damaged_path, monkeypatch, fast=True)
            assert fast == _listing(damaged_path, monkeypatch, fast=False)
            answered += not isinstance(fast, tuple)
    assert answered > 0
