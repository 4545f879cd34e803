"""The numpy implementation of batches of small tensors (the CPU path, no torch) against the torch
one (a torch device, or the CPU without the kernel): counts, histograms, percentiles,
log-magnitude histograms, digests and min/max exactly; mean, std and l2 up to summation order."""

from __future__ import annotations

import math
import mmap
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import TensorInfo
from ckptscope.stats import TensorStats
from ckptscope.stats.batch import BATCH_ELEMENTS, NUMPY_ELEMENTS, batch_stats, batchable
from ckptscope.stats.kernel_engine import load_kernel

FLOATS = ["float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
INTEGERS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
EXACT = ("numel", "zeros", "nan", "inf", "hist", "min", "max", "absmax", "hist_min", "hist_max", "log_hist", "digest")


@pytest.fixture(autouse=True)
def kernel_is_built() -> None:
    """batch_stats takes the numpy path only with the kernel (the test install builds it)."""
    kernel, why = load_kernel()
    assert kernel is not None, why


def floats(dtype: str, seed: int) -> dict[str, torch.Tensor]:
    """Small tensors of a float dtype: random ones of several sizes, then the edge cases."""
    gen = torch.Generator().manual_seed(seed)
    d = getattr(torch, dtype)
    out = {f"r{i}": (torch.randn(n, generator=gen) * 3).to(d) for i, n in enumerate([1, 2, 3, 17, 64, 300, 1000])}
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, -2.25])
    mixed = torch.cat([torch.randn(200, generator=gen), specials]).to(d)  # float8_e4m3fn: Inf becomes NaN
    out |= {
        "mixed": mixed,
        "nan_only": torch.full((5,), math.nan).to(d),
        "nan_and_inf": torch.tensor([math.nan, math.inf, -math.inf]).to(d),  # float8_e4m3fn: all NaN
        "constant": torch.full((40,), 0.3).to(d),
        "single": torch.tensor([-0.7]).to(d),
        "zeros": torch.zeros(33, dtype=d),
        "signed_zeros": torch.tensor([0.0, -0.0, -0.0, 0.0, 1.0, -0.0, 2.0]).to(d),
        "tiny": (torch.tensor([1.0, -1.0, 0.5, 3.0]) * torch.finfo(d).tiny).to(d),  # subnormals and smallest normals
        "huge": torch.tensor([torch.finfo(d).max, -torch.finfo(d).max, 0.0]).to(d),  # the range overflows
        "matrix": (torch.randn(8, 24, generator=gen) * 0.02).to(d),
    }
    if dtype in ("float32", "float64", "float16"):
        subnormal = torch.finfo(d).smallest_normal / 8
        out["subnormal"] = torch.tensor([subnormal, -subnormal, subnormal * 2, 1.0], dtype=d)
    return out


def integers(dtype: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = getattr(torch, dtype)
    if dtype.startswith("uint") and dtype != "uint8":  # torch makes these by conversion or view only
        bits = int(dtype[4:])
        top = 2**bits - 1
        if bits == 64:
            extremes = torch.tensor([0, -1, 2**63 - 1, -(2**63)], dtype=torch.int64).view(torch.uint64)
        else:
            extremes = torch.tensor([0, top, top // 2, 1], dtype=torch.int64).to(d)
        random = torch.randint(0, 2**15, (500,), generator=gen).to(d)
    else:
        info = torch.iinfo(d)
        extremes = torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1], dtype=d)
        random = torch.randint(max(info.min, -(2**40)), min(info.max, 2**40), (500,), generator=gen, dtype=d)
    return {
        "random": random,
        "extremes": extremes,
        "constant": torch.full((30,), 7, dtype=d),
        "single": torch.tensor([3], dtype=d),
        "zeros": torch.zeros(12, dtype=d),
        "matrix": random[:96].reshape(8, 12).clone(),
    }


def booleans(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "random": torch.rand(300, generator=gen) > 0.4,
        "all_true": torch.ones(20, dtype=torch.bool),
        "all_false": torch.zeros(20, dtype=torch.bool),
        "single": torch.tensor([True]),
    }


def of_dtype(dtype: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if dtype in FLOATS:
        return floats(dtype, seed)
    if dtype == "bool":
        return booleans(seed)
    return integers(dtype, seed)


@contextmanager
def batch_of(path: Path) -> Iterator[tuple[mmap.mmap, list[TensorInfo]]]:
    """The file's small tensors in file order (as the engine batches them), with its mapping."""
    infos = sorted((t for t in open_checkpoint(path).tensors if batchable(t)), key=lambda t: t.data_offset)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        yield mm, infos


def bits(value: float | None) -> bytes | None:
    """A float by its bits: -0.0 and 0.0 differ."""
    return None if value is None else struct.pack("<d", value)


def assert_same(got: TensorStats, want: TensorStats, name: str) -> None:
    """min and max as values (where both zeros occur, which one's sign a minimum keeps is the
    reduction's own order); the percentiles by their bits."""
    for key in EXACT:
        assert getattr(got, key) == getattr(want, key), (name, key)
    if want.percentiles is None:
        assert got.percentiles is None, name
    else:
        assert got.percentiles is not None, name
        assert {p: bits(v) for p, v in got.percentiles.items()} == {p: bits(v) for p, v in want.percentiles.items()}, (
            name,
            got.percentiles,
            want.percentiles,
        )
    # summation order differs: relative to the sums' own magnitude (a mean near zero is a
    # difference of large terms, so its error is relative to the values, not to the mean)
    scale = want.absmax or 0.0
    for key in ("mean", "std", "l2"):
        g, w = getattr(got, key), getattr(want, key)
        if w is None:
            assert g is None, (name, key)
        else:
            assert g == pytest.approx(w, rel=1e-12, abs=1e-12 * scale), (name, key, g, w)


def compare(path: Path, extras: bool = True) -> list[TensorStats]:
    with batch_of(path) as (mm, infos):
        assert infos
        got = batch_stats(mm, infos, extras=extras)
        want = batch_stats(mm, infos, "cpu", extras=extras)
    for info, g, w in zip(infos, got, want, strict=True):
        assert_same(g, w, info.name)
    return got


@pytest.mark.parametrize("dtype", [*FLOATS, *INTEGERS, "bool"])
def test_each_dtype_matches_the_torch_implementation(tmp_path, dtype):
    tensors = of_dtype(dtype)
    save_file(tensors, tmp_path / "t.safetensors")
    got = compare(tmp_path / "t.safetensors")
    assert len(got) == len(tensors)  # every tensor was batched
    assert all(s.digest is not None and s.percentiles is not None for s in got if s.nan + s.inf < s.numel)


def test_one_batch_of_every_dtype_matches(tmp_path):
    """Float64 and wide integers beside float32 values: the batch sorts by value, not by float32 key,
    and the zeros' signs keep their file order."""
    tensors = {}
    for dtype in [*FLOATS, *INTEGERS, "bool"]:
        tensors |= {f"{dtype}.{name}": t for name, t in of_dtype(dtype, seed=1).items()}
    save_file(tensors, tmp_path / "all.safetensors")
    got = compare(tmp_path / "all.safetensors")
    assert len(got) == len(tensors)


def test_many_tensors_over_several_sizes(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(1 + (i * 37) % 500, generator=gen) * (i + 1) for i in range(400)}
    tensors |= {f"same{i}": torch.randn(8, 16, generator=gen) for i in range(300)}
    save_file(tensors, tmp_path / "many.safetensors")
    compare(tmp_path / "many.safetensors")


def test_a_full_batch_reduced_in_several_slices(tmp_path):
    gen = torch.Generator().manual_seed(4)
    sizes = [16384] * 15 + [9000, 1]
    tensors = {f"t{i}": torch.randn(n, generator=gen).bfloat16() for i, n in enumerate(sizes)}
    tensors["t2"][::7] = math.nan
    save_file(tensors, tmp_path / "big.safetensors")
    with batch_of(tmp_path / "big.safetensors") as (_, infos):
        assert NUMPY_ELEMENTS < sum(t.numel for t in infos) <= BATCH_ELEMENTS
    compare(tmp_path / "big.safetensors")


def test_moments_and_histogram_alone(tmp_path):
    save_file(of_dtype("float16"), tmp_path / "t.safetensors")
    alone = compare(tmp_path / "t.safetensors", extras=False)
    full = compare(tmp_path / "t.safetensors")
    for a, b in zip(alone, full, strict=True):
        assert a.percentiles is None and a.log_hist is None and a.digest is None
        assert (a.numel, a.zeros, a.nan, a.inf, a.hist, a.mean, a.std, a.min, a.max, a.l2) == (
            b.numel,
            b.zeros,
            b.nan,
            b.inf,
            b.hist,
            b.mean,
            b.std,
            b.min,
            b.max,
            b.l2,
        )


def test_numbers_are_those_of_the_values(tmp_path):
    """Not only agreement between the two: the numbers of a known tensor."""
    x = torch.tensor([[4.0, -2.0, 0.0], [math.nan, 1.0, math.inf]])
    save_file({"x": x, "y": torch.arange(10, dtype=torch.float32)}, tmp_path / "t.safetensors")
    with batch_of(tmp_path / "t.safetensors") as (mm, infos):
        stats = dict(zip((t.name for t in infos), batch_stats(mm, infos), strict=True))
    s = stats["x"]
    assert (s.numel, s.zeros, s.nan, s.inf) == (6, 1, 1, 1)
    assert (s.min, s.max, s.mean, s.absmax) == (-2.0, 4.0, 0.75, 4.0)
    assert s.std == pytest.approx(torch.tensor([4.0, -2.0, 0.0, 1.0]).std().item(), rel=1e-15)
    assert s.l2 == pytest.approx(math.sqrt(21), rel=1e-15)
    assert sum(s.hist) == 4 and s.hist[0] == 1 and s.hist[-1] == 1
    assert s.log_hist is not None and (s.log_hist.neg, s.log_hist.zero, s.log_hist.pos) == ({1: 1}, 1, {0: 1, 2: 1})
    assert s.percentiles is not None and s.percentiles["50"] == 0.5
    y = stats["y"]
    assert y.percentiles is not None
    assert y.percentiles["25"] == pytest.approx(2.25) and y.percentiles["99.9"] == pytest.approx(8.991)


def test_a_transposed_view_is_hashed_in_its_logical_order(tmp_path):
    """A dense permuted view (torch.save keeps strides) is batched; its digest is of its values in
    C order, as every engine's."""
    gen = torch.Generator().manual_seed(6)
    tensors = {"t": torch.randn(12, 20, generator=gen).t(), "plain": torch.randn(50, generator=gen)}
    torch.save(tensors, tmp_path / "t.pt")
    with batch_of(tmp_path / "t.pt") as (_, infos):
        assert {t.name for t in infos} == {"t", "plain"}
    compare(tmp_path / "t.pt")


def test_the_numpy_path_does_not_import_torch(tmp_path):
    save_file(of_dtype("bfloat16"), tmp_path / "t.safetensors")
    script = textwrap.dedent(
        f"""
        import mmap, sys
        import ckptscope.stats.batch as batch
        assert "torch" not in sys.modules, "importing batch.py imported torch"
        from ckptscope.formats import open_checkpoint
        path = {str(tmp_path / "t.safetensors")!r}
        infos = sorted((t for t in open_checkpoint(path).tensors if batch.batchable(t)), key=lambda t: t.data_offset)
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            stats = batch.batch_stats(mm, infos)
        assert len(stats) == len(infos) > 10 and all(s.digest for s in stats)
        assert "torch" not in sys.modules, "the numpy path imported torch"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
