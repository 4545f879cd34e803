"""bfloat16 and float8 values are their key bins' own, so the kernel fills their 64-bin histogram
from pass 1's key bins (``hist_of_keys``) and a seeded pass 2 does none of the histogram's work.
The histogram must be the one the values give, binned in float64 as the torch engine bins them,
whatever the values (NaN, Inf, signed zeros, one value, denormals, huge ranges) and however the
tensor is stored (a safetensors file, a view, pieces); the kernel refuses to seed any other dtype."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.stats import kernel_engine
from ckptscope.stats.engine import choose_engine, compute_stats
from ckptscope.stats.kernel_engine import load_kernel

kernel, why = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"the C kernel is not built: {why}")

SEEDABLE = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stored(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def float64_bins(t: torch.Tensor, lo: float, scale: float) -> list[int]:
    """The torch engine's binning: (x - lo) * scale in float64, clamped to [0, 63]."""
    v = t.double().flatten()
    v = v[torch.isfinite(v)]
    return torch.bincount(((v - lo) * scale).clamp(0, 63).long(), minlength=64).tolist()


def values(dtype: torch.dtype, kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    top = 400.0 if dtype == torch.float8_e4m3fn else 5e4 if dtype == torch.float8_e5m2 else 3e38
    raw = {
        "normal": torch.randn(n, generator=g) * 0.02,
        "positive": torch.rand(n, generator=g) * 5 + 3,
        "negative": -torch.rand(n, generator=g) - 1e-3,
        "tiny": torch.randn(n, generator=g) * 1e-30,
        "wide": torch.randn(n, generator=g) * 1e30,
        "zeros": torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(0.0), torch.tensor(-0.0)),
        "constant": torch.full((n,), 1.5),
    }[kind]
    return raw.clamp(-top, top).to(dtype)


def seeded_and_plain(t: torch.Tensor) -> tuple[list[int], list[int], tuple, tuple, float, float]:
    data, n, code = stored(t), t.numel(), kernel.DTYPES[name(t.dtype)]
    keys = np.zeros(65536, dtype=np.int64)
    finite, total, lo, hi, *_ = kernel.pass1(data, n, code, keys)
    scale = min(64 / (hi - lo), 1e300) if hi > lo else 0.0
    mean, dirty = total / finite, finite != n
    plain, seeded = array("q", bytes(512)), array("q", bytes(512))
    plain_sums = kernel.pass2(data, n, code, dirty, mean, lo, scale, plain, b"", bytearray(), 0, bytearray())
    kernel.hist_of_keys(keys, code, lo, scale, seeded)
    seeded_sums = kernel.pass2(data, n, code, dirty, mean, lo, scale, seeded, b"", bytearray(), 0, bytearray(), True)
    return list(seeded), list(plain), seeded_sums, plain_sums, lo, scale


@pytest.mark.parametrize("dtype", SEEDABLE, ids=name)
@pytest.mark.parametrize("kind", ["normal", "positive", "negative", "tiny", "wide", "zeros", "constant"])
def test_the_histogram_from_the_key_bins_is_the_values_histogram(dtype, kind):
    t = values(dtype, kind, 100_003, seed=len(kind))
    seeded, plain, seeded_sums, plain_sums, lo, scale = seeded_and_plain(t)
    assert seeded == float64_bins(t, lo, scale)
    assert sum(seeded) == t.numel()
    assert seeded_sums == plain_sums  # the centred sums do not change with the seeding
    assert_edge_moves_only(seeded, plain)


def assert_edge_moves_only(seeded: list[int], counted: list[int]) -> None:
    """The counted loop bins in float32 where the range fits: a value on a bin edge may land one
    bin off float64's choice, nothing more (same total, same counts away from the moves)."""
    assert sum(seeded) == sum(counted)
    running = 0
    for a, b in zip(seeded, counted, strict=True):
        running += a - b
        assert abs(running) <= max(a, b)  # counts only cross to a neighbour


def test_nan_and_inf_are_left_out_of_a_seeded_histogram_as_of_a_counted_one():
    t = values(torch.bfloat16, "normal", 70_001, seed=3)
    t[[5, 700, 69_999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    seeded, plain, seeded_sums, plain_sums, lo, scale = seeded_and_plain(t)
    assert seeded == plain == float64_bins(t, lo, scale)
    assert sum(seeded) == t.numel() - 3
    assert seeded_sums == plain_sums


def test_only_dtypes_whose_values_are_their_key_bins_are_seeded():
    hist, keys = array("q", bytes(512)), np.zeros(65536, dtype=np.int64)
    data = stored(torch.randn(64))
    for other in ("float32", "float16", "float64", "int8", "bool"):
        with pytest.raises(ValueError, match="key bins"):
            kernel.hist_of_keys(keys, kernel.DTYPES[other], -1.0, 32.0, hist)
    with pytest.raises(ValueError, match="seeded histogram"):
        kernel.pass2(
            data, 64, kernel.DTYPES["float32"], False, 0.0, -3.0, 10.0, hist, b"", bytearray(), 0, bytearray(), True
        )
    code = kernel.DTYPES["bfloat16"]
    with pytest.raises(ValueError, match="keys buffer"):
        kernel.hist_of_keys(np.zeros(100, dtype=np.int64), code, -1.0, 32.0, hist)
    with pytest.raises(ValueError, match="histogram buffer"):
        kernel.hist_of_keys(keys, code, -1.0, 32.0, array("q", bytes(8 * 63)))
    with pytest.raises(ValueError, match="bad scale"):
        kernel.hist_of_keys(keys, code, float("nan"), 32.0, hist)
    with pytest.raises(TypeError):
        kernel.hist_of_keys(keys, code, -1.0, 32.0, bytes(512))  # read-only
    with pytest.raises(ValueError, match="not aligned"):
        kernel.hist_of_keys(memoryview(bytearray(8 * 65536 + 1))[1:], code, -1.0, 32.0, hist)
    with pytest.raises(ValueError, match="unknown dtype"):
        kernel.hist_of_keys(keys, 99, -1.0, 32.0, hist)
    assert list(hist) == [0] * 64  # nothing written by a refused call


def recording_seeds(monkeypatch) -> list[bool]:
    """Whether each histogram pass 2 started from came seeded."""
    seen: list[bool] = []
    real = kernel_engine.new_histogram

    def recorded(*args, **kwargs):
        hist, from_keys = real(*args, **kwargs)
        seen.append(from_keys)
        return hist, from_keys

    monkeypatch.setattr(kernel_engine, "new_histogram", recorded)
    return seen


def stats_of(path, *, seeding: bool, monkeypatch) -> dict:
    monkeypatch.setattr(kernel_engine, "SEEDED_MIN", 1 if seeding else 1 << 62)
    seen = recording_seeds(monkeypatch)
    ckpt = open_checkpoint(path)
    stats = {k: v.to_json() for k, v in compute_stats(ckpt.tensors, engine=choose_engine(), workers=1).items()}
    assert seen.count(True) == (4 if seeding else 0)  # every bfloat16 and float8 tensor; never float32
    return stats


def test_whole_files_give_the_same_stats_seeded_or_counted_and_the_torch_engines_histogram(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 700, generator=g) * 0.05
    tensors = {
        "bf16": base.bfloat16(),
        "bf16_dirty": torch.where(base > 0.15, torch.tensor(float("nan")), base).bfloat16(),
        "e4m3": (base * 100).clamp(-400, 400).to(torch.float8_e4m3fn),
        "e5m2": (base * 100).to(torch.float8_e5m2),
        "f32": base.clone(),  # never seeded: the counted path beside it
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    seeded = stats_of(path, seeding=True, monkeypatch=monkeypatch)
    counted = stats_of(path, seeding=False, monkeypatch=monkeypatch)
    for key in tensors:
        assert {**seeded[key], "hist": None} == {**counted[key], "hist": None}, key
        assert_edge_moves_only(seeded[key]["hist"], counted[key]["hist"])
    ckpt = open_checkpoint(path)
    by_torch = compute_stats(ckpt.tensors, engine=choose_engine("cpu"), workers=1)
    for key in tensors:
        assert seeded[key]["hist"] == by_torch[key].to_json()["hist"], key
        assert sum(seeded[key]["hist"]) == int(torch.isfinite(tensors[key].float()).sum())


def test_a_strided_view_and_the_seeding_threshold(tmp_path, monkeypatch):
    """A transposed bfloat16 view is walked in pieces of rows; its histogram is its values'."""
    t = (torch.randn(512, 384) * 0.1).bfloat16()
    path = tmp_path / "view.pt"
    torch.save({"w": t, "wt": t.t()}, path)
    seen = recording_seeds(monkeypatch)
    for threshold in (1, kernel_engine.SEEDED_MIN, 1 << 62):
        monkeypatch.setattr(kernel_engine, "SEEDED_MIN", threshold)
        seen.clear()
        ckpt = open_checkpoint(path)
        stats = compute_stats(ckpt.tensors, engine=choose_engine(), workers=1)
        assert any(seen) == (threshold <= t.numel())
        lo, hi = float(t.float().min()), float(t.float().max())
        want = float64_bins(t, lo, 64 / (hi - lo))
        for key in ("w", "wt"):
            if threshold <= t.numel():
                assert stats[key].hist == want
            else:
                assert_edge_moves_only(want, stats[key].hist)


def test_a_tensor_stitched_from_pieces_bins_each_piece_over_the_whole_range(tmp_path, monkeypatch):
    """A torch.distributed.checkpoint tensor in three pieces (pieced.py): each piece's histogram
    is seeded from its own key bins over the whole tensor's range."""
    from tests.stats.test_percentiles import stitched_dcp

    g = torch.Generator().manual_seed(11)
    whole = torch.cat([torch.randn(200, 64, generator=g) * s for s in (0.01, 0.1, 1.0)]).bfloat16()
    path = stitched_dcp(tmp_path / "ck", {"w": whole}, pieces=3)
    seen = recording_seeds(monkeypatch)
    results = []
    for threshold in (1, 1 << 62):
        monkeypatch.setattr(kernel_engine, "SEEDED_MIN", threshold)
        seen.clear()
        ckpt = open_checkpoint(path)
        (info,) = [t for t in ckpt.tensors if t.name == "w"]
        assert len(info.pieces) == 3
        results.append(compute_stats([info], engine=choose_engine(), workers=1)["w"].to_json())
        assert seen.count(True) == (3 if threshold == 1 else 0)
    lo, hi = float(whole.float().min()), float(whole.float().max())
    assert {**results[0], "hist": None} == {**results[1], "hist": None}
    assert results[0]["hist"] == float64_bins(whole, lo, 64 / (hi - lo))
    assert_edge_moves_only(results[0]["hist"], results[1]["hist"])  # (here bins 23 and 24 differ)
