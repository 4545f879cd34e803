"""Statistics, comparison and decoding of GGUF tensors (quantised blocks decoded chunk by chunk),
every engine against numpy over ``gguf.GGUFReader`` + ``gguf.quants.dequantize``."""

from __future__ import annotations

import json
import mmap
import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from ckptscope.formats import open_checkpoint
from ckptscope.formats.gguf_decoding import can_decode, decoded_chunks
from ckptscope.services.operations import diff_tensors
from ckptscope.stats import HIST_BINS
from ckptscope.stats import engine as stats_engine
from ckptscope.stats.batch import SMALL_ELEMENTS, batchable
from ckptscope.stats.compare import compare
from ckptscope.stats.engine import choose_engine, compute_stats
from ckptscope.stats.walk import CHUNK_ELEMENTS, Buffers, TensorWalker, plan_view, unsupported_note
from tests.formats.test_gguf import QUANTIZED_BY_GGUF, RANDOM_BLOCKS, reference_values, write_gguf


@pytest.fixture(params=["kernel", "fallback", "cpu"])
def engine(request, monkeypatch):
    """The C kernel; the torch-op engine as the CPU fallback; the torch-op engine on the "cpu"
    torch device (the code a CUDA device runs: each chunk copied to the device)."""
    if request.param == "kernel":
        chosen = choose_engine()
        assert chosen.name == "kernel", chosen.description
    elif request.param == "fallback":
        monkeypatch.setattr(stats_engine, "load_kernel", lambda: (None, "not built (test)"))
        chosen = choose_engine()
        assert chosen.name == "torch-fallback"
    else:
        chosen = choose_engine("cpu")
    return chosen


def reference(values: np.ndarray) -> dict:
    x = values.astype(np.float64).ravel()
    finite = x[np.isfinite(x)]
    out = {"numel": x.size, "zeros": int((x == 0).sum()), "nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum())}
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        out |= {
            "mean": finite.mean(),
            "std": finite.std(ddof=1) if finite.size > 1 else None,
            "min": lo,
            "max": hi,
            "l2": float(np.sqrt(np.dot(finite, finite))),
            "absmax": float(np.abs(finite).max()),
        }
        if hi > lo:
            t = (finite - lo) * (HIST_BINS / (hi - lo))
            idx = np.clip(t.astype(np.int64), 0, HIST_BINS - 1)
            out["hist"] = np.bincount(idx, minlength=HIST_BINS).tolist()
            # decoded values sit on a lattice: some lie on a bin edge, where the kernel's float32
            # bin arithmetic may put them one bin away from this float64 one
            out["on_edges"] = int((np.abs(t - np.round(t)) < 1e-4).sum())
        else:
            out["hist"] = [finite.size] + [0] * (HIST_BINS - 1)
            out["on_edges"] = 0
    return out


def assert_matches(stats, values: np.ndarray, name: str) -> None:
    ref = reference(values)
    got = stats.to_json()
    assert got["note"] is None, (name, got["note"])
    for key in ("numel", "zeros", "nan", "inf"):
        assert got[key] == ref[key], (name, key, got[key], ref[key])
    for key in ("mean", "std", "min", "max", "l2", "absmax"):
        assert got[key] == pytest.approx(ref[key], rel=1e-7, abs=1e-12), (name, key)
    assert sum(got["hist"]) == sum(ref["hist"]), name
    moved = sum(abs(a - b) for a, b in zip(got["hist"], ref["hist"], strict=True))
    assert moved <= 2 + 2 * ref.get("on_edges", 0), (name, got["hist"], ref["hist"])
    json.dumps(got, allow_nan=False)


ALL_TYPES = ["F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64", *QUANTIZED_BY_GGUF, *RANDOM_BLOCKS]


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """One tensor of each type, small (batched when plain) and one above SMALL_ELEMENTS."""
    tensors = []
    for type_name in ALL_TYPES:
        tensors.append((f"small.{type_name}", type_name, (3, 256)))
        tensors.append((f"big.{type_name}", type_name, (72, 256)))  # 18432 values > SMALL_ELEMENTS
    return write_gguf(tmp_path_factory.mktemp("gguf") / "every.gguf", tensors, seed=7)


def test_every_type_matches_numpy(every_type, engine):
    ckpt = open_checkpoint(every_type)
    assert max(t.numel for t in ckpt.tensors) > SMALL_ELEMENTS
    stats = compute_stats(ckpt.tensors, engine=engine)
    values = reference_values(every_type)
    for t in ckpt.tensors:
        assert_matches(stats[t.name], values[t.name], t.name)


def test_big_tensors_decode_over_several_chunks(tmp_path, engine):
    path = write_gguf(tmp_path / "big.gguf", [("q8", "Q8_0", (1100, 1024)), ("q4k", "Q4_K", (5, 262144))], seed=3)
    ckpt = open_checkpoint(path)
    assert all(t.numel > CHUNK_ELEMENTS for t in ckpt.tensors)
    stats = compute_stats(ckpt.tensors, engine=engine)
    values = reference_values(path)
    for t in ckpt.tensors:
        assert_matches(stats[t.name], values[t.name], t.name)


def _patched_scales(tmp_path):
    """Q8_0 blocks whose float16 scale is NaN or Inf, as a damaged or adversarial file has them."""
    rng = np.random.default_rng(0)
    blocks = quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    blocks = blocks.reshape(4, 2, 34).copy()
    blocks[0, 0, :2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    blocks[2, 1, :2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    w = GGUFWriter(str(tmp_path / "nan.gguf"), "llama")
    w.add_tensor("bad", blocks.reshape(4, 68), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "nan.gguf"


def test_non_finite_scales_count_as_nan_and_inf(tmp_path, engine):
    path = _patched_scales(tmp_path)
    values = reference_values(path)["bad"]
    assert np.isnan(values).sum() >= 32 and np.isinf(values).any()
    stats = compute_stats(open_checkpoint(path).tensors, engine=engine)["bad"]
    assert_matches(stats, values, "bad")


def test_undecodable_encodings_get_a_note_not_a_crash(tmp_path, engine):
    path = write_gguf(tmp_path / "u.gguf", [("a", "Q8_K", (2, 256)), ("b", "Q8_1", (2, 32)), ("c", "Q8_0", (1, 32))])
    ckpt = open_checkpoint(path)
    stats = compute_stats(ckpt.tensors, engine=engine)
    for name, enc in (("a", "Q8_K"), ("b", "Q8_1")):
        assert not can_decode(enc)
        assert stats[name].numel == ckpt.tensors[0].numel if name == "a" else 64
        assert stats[name].note is not None and enc in stats[name].note and "no decoder" in stats[name].note
        assert stats[name].mean is None
    assert stats["c"].note is None and stats["c"].mean is not None
    assert unsupported_note(ckpt.tensors[2]) is None


def test_encoded_tensors_are_walked_not_batched_and_decoded_in_bounded_chunks(tmp_path):
    path = write_gguf(tmp_path / "w.gguf", [("tiny", "Q4_0", (1, 32)), ("big", "Q6_K", (9, 262144))])
    tiny, big = open_checkpoint(path).tensors
    assert not batchable(tiny) and tiny.numel <= SMALL_ELEMENTS
    plan = plan_view(big)
    assert plan.dense and plan.count == big.numel and plan.factor == 1
    values = reference_values(path)["big"].ravel()
    bufs = Buffers()
    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        walker = TensorWalker(mm, big, plan, bufs)
        done = 0
        sizes = []
        for chunk in walker.chunks():
            n = chunk.n
            sizes.append(n)
            assert chunk.dtype == "float32" and n % 256 == 0 and n <= CHUNK_ELEMENTS
            assert chunk.buffer.obj is bufs.raw_f32  # written into the walker's buffer
            assert len(chunk.buffer) == n * 4 and bytes(chunk.buffer[:4]) == values[done : done + 1].tobytes()
            assert bytes(chunk.buffer) == values[done : done + n].tobytes()
            done += n
        assert done == big.numel and len(sizes) == 3
        walker.release()
        assert max(v.size for v in decoded_chunks(mm, big, 5000)) <= 5000
        del chunk, walker
        mm.close()


def test_compare_and_diff_decode_both_sides(tmp_path):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 256)) * 0.1).astype(np.float32)
    blocks = quants.quantize(x, GGMLQuantizationType.Q8_0)
    for name, tensors in {"a": [("w", blocks, GGMLQuantizationType.Q8_0)], "b": [("w", x, None)]}.items():
        w = GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        for tname, data, raw in tensors:
            w.add_tensor(tname, data, raw_dtype=raw)
        w.add_tensor("same", blocks, raw_dtype=GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    a, b = open_checkpoint(tmp_path / "a.gguf"), open_checkpoint(tmp_path / "b.gguf")
    decoded = quants.dequantize(blocks, GGMLQuantizationType.Q8_0).astype(np.float64)
    got = compare(a.tensors[0], b.tensors[0])
    d = decoded - x.astype(np.float64)
    assert got["identical"] is False and "dequantized" in got["note"] and "Q8_0" in got["note"]
    assert got["max_abs_diff"] == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert got["rel_l2"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(decoded), rel=1e-9)
    assert got["cosine"] == pytest.approx(decoded.ravel() @ x.ravel() / np.linalg.norm(decoded) / np.linalg.norm(x))
    same = compare(a.tensors[1], b.tensors[1])
    assert same["identical"] is True and same["max_abs_diff"] == 0.0
    result = diff_tensors(a.tensors, b.tensors)
    rows = {r["name"]: r for r in result["tensors"]}
    assert rows["w"]["status"] == "dtype_changed" and (rows["w"]["dtype_a"], rows["w"]["dtype_b"]) == ("Q8_0", "F32")
    assert rows["same"]["status"] == "identical" and rows["same"]["dtype_a"] == "Q8_0"


def test_gguf_reader_and_our_stats_agree_on_a_multi_dim_tensor(tmp_path):
    """A 3-D tensor: GGUF dims reversed into torch order, the values in the same order."""
    path = write_gguf(tmp_path / "m.gguf", [("t", "Q4_1", (3, 4, 64))])
    (t,) = open_checkpoint(path).tensors
    (ref,) = GGUFReader(str(path)).tensors
    assert t.shape == (3, 4, 64) and ref.shape.tolist() == [64, 4, 3]
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        got = np.concatenate(list(decoded_chunks(mm, t, 64)))
        mm.close()
    assert np.array_equal(got.reshape(t.shape), quants.dequantize(ref.data, ref.tensor_type))
