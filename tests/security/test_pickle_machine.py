"""The pickle machine records, and nothing in a file can tamper with it: BUILD states are only
recorded (no stand-in, record or later file changes), tensors are validated once from the
finished graph, and every step whose cost a file's size does not pay for is budgeted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint
from ckptscope.stats.engine import compute_stats
from tests.hostile_corpus import pkl_global as _global
from tests.hostile_corpus import pkl_int as _int
from tests.hostile_corpus import pkl_str as _str
from tests.hostile_corpus import shared_tuples as _shared_tuples
from tests.hostile_corpus import tensor_data_pkl as tensor_pkl
from tests.hostile_corpus import tensor_zip


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    path.write_bytes(tensor_zip(data_pkl))
    return path


def refused(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    return info.value


def test_the_hand_built_pickle_reads_like_torch(tmp_path):
    """The control: the bytes these tests start from are a valid checkpoint."""
    ckpt = open_checkpoint(torch_zip(tmp_path / "ok.pt", tensor_pkl()))
    (w,) = ckpt.tensors
    assert (w.name, w.dtype, w.shape, w.storage_offset) == ("w", "float32", (4,), 0)
    assert compute_stats(ckpt.tensors)["w"].mean == pytest.approx(1.5)


def test_build_on_a_tensor_cannot_move_it_outside_its_storage(tmp_path):
    state = b"}(" + _str("storage_offset") + _int(-1000) + _str("_shape") + b"(" + _int(-1) + b"tu"
    ckpt = open_checkpoint(torch_zip(tmp_path / "t.pt", tensor_pkl(after_tensor=state + b"b")))
    (w,) = ckpt.tensors
    assert (w.storage_offset, w.shape, w.stride) == (0, (4,), (1,))
    assert compute_stats(ckpt.tensors)["w"].mean == pytest.approx(1.5)  # read inside the storage


def test_build_on_a_shared_stand_in_changes_nothing_for_this_file_or_the_next(tmp_path):
    """BUILD on the global ``torch.FloatStorage`` (a frozen dataclass has a ``__setstate__``) once
    switched the stand-in to another dtype for the rest of the process."""
    tampered = _global("torch", "FloatStorage") + b"}(" + _str("dtype") + _str("float64") + b"ub"
    first = open_checkpoint(torch_zip(tmp_path / "a.pt", tensor_pkl(storage_class=tampered)))
    second = open_checkpoint(torch_zip(tmp_path / "b.pt", tensor_pkl()))
    assert first.tensors[0].dtype == "float32" and second.tensors[0].dtype == "float32"
    assert second.tensors[0].storage.nbytes == 16


@pytest.mark.parametrize(
    ("hostile", "fragment"),
    [
        ({"offset": _int(-1)}, "storage offset"),
        ({"shape": b"(" + _int(-4) + b"t"}, "negative"),
        ({"shape": b"(" + _int(8) + b"t"}, "beyond the end of its storage"),
        ({"extra_args": b"\x89" + _global("collections", "OrderedDict") + b")R" + _int(7) * 3}, "wrong arguments"),
        ({"builder": "_rebuild_tensor_v3", "extra_args": b"\x89N]" + b"N"}, "dtype"),  # a list where a dtype belongs
        ({"storage_class": _global("torch", "float32")}, "storage type"),
    ],
)
def test_tensors_are_validated_once_from_the_graph(tmp_path, hostile, fragment):
    err = refused(torch_zip(tmp_path / "t.pt", tensor_pkl(**hostile)))
    assert err.code == "corrupt_pickle" and fragment in err.message, err.message
    assert "Error" not in err.message  # our words, never Python's exception text


@pytest.mark.parametrize(
    "wrap",
    [
        b"}h\x3cK\x01s",  # {t60: 1}: hashing the key walks 2**60 tuples
        b"(h\x3c\x91",  # frozenset({t60})
        b"\x8f(h\x3c\x90",  # a set holding t60
        b"(h\x3cK\x01d",  # DICT opcode
        b"]h\x3ca",  # [t60]: unfolding the tree
    ],
)
def test_exponentially_shared_structures_are_refused_within_seconds(tmp_path, wrap):
    path = torch_zip(tmp_path / "bomb.pt", _shared_tuples(60) + wrap + b".")
    started = time.monotonic()
    err = refused(path)
    assert time.monotonic() - started < 3
    assert err.code == "limit_exceeded", err


def test_deep_nesting_is_a_corrupt_pickle_with_our_message(tmp_path):
    err = refused(torch_zip(tmp_path / "deep.pt", b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."))
    assert err.code in ("corrupt_pickle", "no_tensors") and "Error" not in err.message, err


@pytest.mark.parametrize(
    "body",
    [
        b"\x80\x02(K\x01K\x02K\x03u.",  # SETITEMS on nothing
        b"\x80\x02K\x01\x94h\x05.",  # BINGET of a missing memo entry
        b"\x80\x02\x82\x01.",  # EXT1 with an unregistered code
        b"\x80\x02}K\x01",  # no STOP
        b"\x80\x02N\xff.",  # an opcode that does not exist
    ],
)
def test_malformed_pickles_are_corrupt_pickle(tmp_path, body):
    err = refused(torch_zip(tmp_path / "bad.pt", body))
    assert err.code == "corrupt_pickle", err
    assert "Error" not in err.message and "Traceback" not in err.message


def test_a_global_outside_the_state_dict_vocabulary_is_refused_before_anything_runs(tmp_path):
    body = b"\x80\x02" + _global("os", "system") + b"(" + _str("touch /tmp/ckptscope-pwned") + b"tR."
    err = refused(torch_zip(tmp_path / "rce.pt", body))
    assert err.code == "unsafe_pickle" and "os.system" in err.message
    assert not Path("/tmp/ckptscope-pwned").exists()
