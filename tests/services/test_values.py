"""A tensor's values for the detail panel (ckptscope/services/values.py), read from real files of
every kind: plain views, bf16, torch quantized (dequantized), GGUF-encoded (decoded), stitched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import Piece
from ckptscope.services import values as svc
from ckptscope.stats.engine import compute_stats
from tests import factories as f
from tests.formats.test_gguf import reference_values, write_gguf


def listed(path):
    return {t.name: t for t in open_checkpoint(path).tensors}


def test_tiny_float_tensors_show_their_values_in_row_major_order(tmp_path):
    tensors = {
        "bias": torch.tensor([0.5, -1.25, 3.0, float("nan")]),
        "matrix_t": torch.arange(6.0).reshape(2, 3).t(),  # not row-major in the file
        "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "scalar": torch.tensor(7.0, dtype=torch.float64),
    }
    infos = listed(f.save_torch(tensors, tmp_path / "t.pt"))
    got = svc.tensor_values(infos["bias"])
    assert got.category == "float" and got.values[:3] == [0.5, -1.25, 3.0] and np.isnan(got.values[3])
    assert got.distinct is None
    assert svc.tensor_values(infos["matrix_t"]).values == tensors["matrix_t"].reshape(-1).tolist()
    assert svc.tensor_values(infos["half"]).values == [1.5, -2.0]
    assert svc.tensor_values(infos["scalar"]).values == [7.0]


def test_big_float_tensors_are_not_read(tmp_path):
    infos = listed(f.save_safetensors({"w": torch.zeros(65)}, tmp_path / "t.safetensors"))
    assert svc.tensor_values(infos["w"]) == svc.TensorValues("float")


def test_integer_and_bool_tensors_with_few_values_get_counts(tmp_path):
    tensors = {
        "labels": torch.tensor([0] * 500 + [3] * 200 + [7] * 50, dtype=torch.int64),
        "mask": torch.rand(300, generator=torch.Generator().manual_seed(0)) < 0.25,
        "many": torch.arange(100, dtype=torch.int32),
        "u8": torch.tensor([255, 1, 255], dtype=torch.uint8),
    }
    path = f.save_safetensors(tensors, tmp_path / "t.safetensors")
    infos = listed(path)
    stats = compute_stats(list(infos.values()))
    labels = svc.tensor_values(infos["labels"], stats["labels"])
    assert labels.category == "int" and labels.distinct == [(0, 500), (3, 200), (7, 50)] and labels.values is None
    trues = int(tensors["mask"].sum())
    assert svc.tensor_values(infos["mask"], stats["mask"]).distinct == [(False, 300 - trues), (True, trues)]
    assert svc.tensor_values(infos["many"], stats["many"]).distinct is None  # 100 values: a histogram
    u8 = svc.tensor_values(infos["u8"], stats["u8"])
    assert u8.values == [255, 1, 255] and u8.distinct == [(1, 1), (255, 2)]


def test_counting_is_bounded(tmp_path, monkeypatch):
    infos = listed(f.save_safetensors({"ids": torch.zeros(1000, dtype=torch.int64)}, tmp_path / "t.safetensors"))
    monkeypatch.setattr(svc, "MAX_COUNTED", 999)
    assert svc.tensor_values(infos["ids"]).distinct is None
    monkeypatch.setattr(svc, "MAX_COUNTED", 1000)
    assert svc.tensor_values(infos["ids"]).distinct == [(0, 1000)]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_tensors_read_as_their_dequantized_values(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(3, 4), 0.05, 2, torch.qint8)
    pc = torch.quantize_per_channel(
        torch.randn(3, 5), torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64), torch.tensor([0, 3, 1]), 0, torch.quint8
    )
    infos = listed(f.save_torch({"q": q, "pc": pc}, tmp_path / "q.pt"))
    for name, t in (("q", q), ("pc", pc)):
        got = svc.tensor_values(infos[name])
        assert got.category == "float" and got.distinct is None  # integers underneath, values are floats
        assert got.values == pytest.approx(t.dequantize().double().reshape(-1).tolist(), abs=1e-6)


def test_gguf_encoded_tensors_read_as_their_decoded_values(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", [("blk.0.q", "Q8_0", (2, 32)), ("blk.0.n", "F32", (8,))])
    infos = listed(path)
    want = reference_values(path)
    for name in ("blk.0.q", "blk.0.n"):
        got = svc.tensor_values(infos[name])
        assert got.category == "float"
        assert got.values == pytest.approx(want[name].astype(np.float64).reshape(-1).tolist(), rel=1e-6, abs=1e-6)


def test_stitched_tensors_read_as_the_whole_tensor(tmp_path):
    top, bottom = torch.arange(8, dtype=torch.int16).reshape(2, 4), torch.arange(8, 16, dtype=torch.int16).reshape(2, 4)
    parts = listed(f.save_safetensors({"a": top, "b": bottom}, tmp_path / "parts.safetensors"))
    whole = parts["a"]._replace(
        name="w", shape=(4, 4), stride=(4, 1), pieces=(Piece((0, 0), parts["a"]), Piece((2, 0), parts["b"]))
    )
    got = svc.tensor_values(whole)
    assert got.category == "int" and got.values == list(range(16))
    assert got.distinct == [(i, 1) for i in range(16)]


def test_an_unreadable_file_leaves_the_panel_without_values(tmp_path):
    path = f.save_safetensors({"b": torch.ones(3)}, tmp_path / "t.safetensors")
    infos = listed(path)
    path.write_bytes(b"")  # the blob went away under us
    assert svc.tensor_values(infos["b"]) == svc.TensorValues("float")


def test_complex_tensors_are_not_read(tmp_path):
    infos = listed(f.save_torch({"c": torch.ones(3, dtype=torch.complex64)}, tmp_path / "c.pt"))
    assert svc.tensor_values(infos["c"]) == svc.TensorValues("complex")
