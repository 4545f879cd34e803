"""The stats engine against torch computed independently, for every dtype and view kind."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptscope.formats import open_checkpoint
from ckptscope.stats import HIST_BINS, TensorStats
from ckptscope.stats import engine as stats_engine
from ckptscope.stats.batch import SMALL_ELEMENTS
from ckptscope.stats.engine import choose_engine, compute_stats
from ckptscope.stats.walk import CHUNK_ELEMENTS
from tests import factories as f


def reference(t: torch.Tensor) -> dict:
    """What the stats should be, computed plainly in float64 by torch."""
    x = t.reshape(-1).to(torch.float64)
    finite = x[torch.isfinite(x)]
    out = {
        "numel": t.numel(),
        "zeros": int((x == 0).sum()),
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }
    if finite.numel():
        lo, hi = finite.min().item(), finite.max().item()
        out |= {
            "mean": finite.mean().item(),
            "std": finite.std().item() if finite.numel() > 1 else None,
            "min": lo,
            "max": hi,
            "l2": finite.norm().item(),
            "absmax": finite.abs().max().item(),
        }
        if hi > lo:
            out["hist"] = torch.histc(finite, HIST_BINS, lo, hi).to(torch.int64).tolist()
        else:
            out["hist"] = [finite.numel()] + [0] * (HIST_BINS - 1)
    return out


def assert_stats_match(stats: TensorStats, t: torch.Tensor, name: str = "", copies: int = 1) -> None:
    """``copies``: how many times each value repeats (a value on a bin edge moves with its copies)."""
    ref = reference(t)
    got = stats.to_json()
    for key in ("numel", "zeros", "nan", "inf"):
        assert got[key] == ref[key], (name, key)
    for key in ("mean", "std", "min", "max", "l2", "absmax"):
        if ref.get(key) is None:
            assert got[key] is None, (name, key)
        else:
            assert got[key] == pytest.approx(ref[key], rel=1e-7, abs=1e-12), (name, key)
    if "hist" in ref:
        assert sum(got["hist"]) == sum(ref["hist"]), name
        # bin edges computed in float32 vs float64 may move a value sitting on an edge by one bin
        moved = sum(abs(a - b) for a, b in zip(got["hist"], ref["hist"], strict=True))
        assert moved <= max(2, ref["numel"] // copies // 10000) * copies, (name, got["hist"], ref["hist"])
    json.dumps(got, allow_nan=False)


@pytest.fixture(params=["kernel", "fallback", "cpu"])
def engine(request, monkeypatch):
    """Every engine, against the same references: the C kernel; the torch-op engine as the CPU
    fallback where the kernel is not built; the torch-op engine on the "cpu" torch device (the
    CUDA path's code)."""
    if request.param == "kernel":
        chosen = choose_engine()
        assert chosen.name == "kernel", chosen.description  # the test install builds the kernel
    elif request.param == "fallback":
        monkeypatch.setattr(stats_engine, "load_kernel", lambda: (None, "not built (test)"))
        chosen = choose_engine()
        assert chosen.name == "torch-fallback"
    else:
        chosen = choose_engine("cpu")
    return chosen


def stats_of(tmp_path, tensors: dict[str, torch.Tensor], fmt: str = "safetensors", **kwargs):
    if fmt == "safetensors":
        path = f.save_safetensors(tensors, tmp_path / "t.safetensors")
    else:
        path = f.save_torch(tensors, tmp_path / "t.pt", legacy=fmt == "legacy")
    ckpt = open_checkpoint(path)
    return compute_stats(ckpt.tensors, **kwargs)


DTYPE_CASES = {
    "float64": lambda: torch.randn(5000, dtype=torch.float64) * 3 + 1,
    "float32": lambda: torch.randn(300, 700) * 0.02,
    "float16": lambda: (torch.randn(4096) * 10).half(),
    "bfloat16": lambda: torch.randn(64, 65).bfloat16(),
    "float8_e4m3fn": lambda: torch.randn(2000).to(torch.float8_e4m3fn),
    "float8_e5m2": lambda: torch.randn(2000).to(torch.float8_e5m2),
    "int64": lambda: torch.randint(-(2**40), 2**40, (3000,)),
    "int32": lambda: torch.randint(-1000, 1000, (3000,), dtype=torch.int32),
    "int16": lambda: torch.randint(-300, 300, (999,), dtype=torch.int16),
    "int8": lambda: torch.randint(-128, 127, (999,), dtype=torch.int8),
    "uint8": lambda: torch.randint(0, 255, (999,), dtype=torch.uint8),
    "bool": lambda: torch.rand(777) > 0.3,
}


@pytest.mark.parametrize("dtype", list(DTYPE_CASES))
def test_every_dtype_matches_torch(tmp_path, dtype, engine):
    torch.manual_seed(3)
    t = DTYPE_CASES[dtype]()
    stats = stats_of(tmp_path, {"t": t}, engine=engine)["t"]
    assert_stats_match(stats, t, dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_CASES))
def test_every_dtype_through_the_kernel_matches_torch(tmp_path, dtype, engine):
    """Tensors above SMALL_ELEMENTS go chunk by chunk through the C kernel, not the batch path."""
    torch.manual_seed(5)
    copies = SMALL_ELEMENTS // 300
    t = DTYPE_CASES[dtype]().reshape(-1).repeat(copies)
    assert t.numel() > SMALL_ELEMENTS
    if t.is_floating_point():
        t[:50] = 0.0
        t[50:90] = -0.0  # a zero too, with its sign bit set
    stats = stats_of(tmp_path, {"t": t}, engine=engine)["t"]
    assert_stats_match(stats, t, dtype, copies)


@pytest.mark.parametrize(
    "values",
    [
        [-3.0e38, 3.0e38, -1.0e38, 1.0e38],  # width overflows float32
        [1.0, 1.0 + 2**-23, 1.0],  # one float32 step wide
        [0.0, 1e-45, 2e-45],  # denormal width
        [5.0, float("nan"), 0.0, float("-inf"), -0.0, 7.0],  # non-finite beside zeros of both signs
    ],
)
def test_kernel_edge_ranges(tmp_path, values, engine):
    copies = SMALL_ELEMENTS // len(values) + 7
    t = torch.tensor(values, dtype=torch.float32).repeat(copies)
    stats = stats_of(tmp_path, {"t": t}, engine=engine)["t"]
    assert_stats_match(stats, t, copies=copies)
    assert sum(stats.hist) == stats.numel - stats.nan - stats.inf


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy"])
def test_multi_chunk_tensor_with_nan_and_inf(tmp_path, fmt, engine):
    torch.manual_seed(4)
    t = torch.randn(CHUNK_ELEMENTS * 2 + 12345)
    t[7] = float("nan")
    t[CHUNK_ELEMENTS + 3] = float("inf")
    t[-1] = float("-inf")
    t[100:200] = 0
    stats = stats_of(tmp_path, {"t": t}, fmt, engine=engine)["t"]
    assert stats.nan == 1 and stats.inf == 2 and stats.zeros == 100
    assert_stats_match(stats, t)


def test_all_nan_tensor_has_counts_and_no_values(tmp_path, engine):
    t = torch.full((10,), float("nan"))
    stats = stats_of(tmp_path, {"t": t}, engine=engine)["t"]
    assert stats.nan == 10
    assert stats.to_json()["mean"] is None and stats.to_json()["std"] is None
    assert json.dumps(stats.to_json(), allow_nan=False)


def test_huge_values_do_not_overflow_float32_squares(tmp_path, engine):
    t = torch.randn(50000) * 1e30
    assert_stats_match(stats_of(tmp_path, {"t": t}, engine=engine)["t"], t)


def test_empty_scalar_and_constant_tensors(tmp_path, engine):
    tensors = {"empty": torch.zeros(0, 5), "scalar": torch.tensor(-2.5), "const": torch.full((100,), 7.0)}
    stats = stats_of(tmp_path, tensors, engine=engine)
    assert stats["empty"].numel == 0 and stats["empty"].mean is None and sum(stats["empty"].hist) == 0
    assert stats["scalar"].mean == -2.5 and stats["scalar"].std is None and stats["scalar"].hist[0] == 1
    assert stats["const"].std == 0.0 and stats["const"].hist[0] == 100
    for name in ("scalar", "const"):
        assert_stats_match(stats[name], tensors[name], name)


def test_views_transposed_gapped_and_expanded(tmp_path, engine):
    torch.manual_seed(5)
    base = torch.randn(300, 400)
    views = {
        "transposed": base.t(),
        "every_other_column": base[:, ::2],
        "row": base[7],
        "expanded": torch.randn(1, 400).expand(2000, 400),
        "expanded_middle": torch.randn(3, 1, 5).expand(3, 1000, 5),
    }
    stats = stats_of(tmp_path, views, "zip", engine=engine)
    for name, view in views.items():
        assert stats[name].numel == view.numel()
        assert_stats_match(stats[name], view, name)


def test_tied_tensors_are_computed_once_and_reported_for_both(tmp_path):
    model = f.TinyTransformer(layers=1)
    path = f.save_torch(model.state_dict(), tmp_path / "tied.pt")
    ckpt = open_checkpoint(path)
    stats = compute_stats(ckpt.tensors)
    assert stats["lm_head.weight"] is stats["embed.weight"]
    assert_stats_match(stats["embed.weight"], model.embed.weight.detach())


def test_single_worker_and_two_workers_agree(tmp_path):
    torch.manual_seed(6)
    tensors = {f"t{i}": torch.randn(1000 + i * 5000) for i in range(8)}
    a = stats_of(tmp_path, tensors, workers=1)
    b = stats_of(tmp_path, tensors, workers=2)
    assert {k: v.to_json() for k, v in a.items()} == {k: v.to_json() for k, v in b.items()}


def test_progress_reports_bytes_up_to_total(tmp_path):
    tensors = {f"t{i}": torch.randn(20000) for i in range(5)}  # above the batching size: one call each
    tensors |= {f"small{i}": torch.randn(10) for i in range(100)}  # batched: one call for all
    calls = []
    stats_of(tmp_path, tensors, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == 6
    assert calls[-1] == (404000, 404000)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_complex_tensors_are_listed_but_not_summarised(tmp_path, engine):
    stats = stats_of(tmp_path, {"c": torch.randn(4, dtype=torch.complex64)}, "zip", engine=engine)["c"]
    assert stats.numel == 4 and stats.mean is None and "complex64" in stats.note


@pytest.mark.slow
def test_resident_memory_stays_flat_on_a_big_file(tmp_path):
    """512 MiB of float32 must not need 512 MiB of RSS: finished ranges are released."""
    path = tmp_path / "big.safetensors"
    script = textwrap.dedent(
        f"""
        import resource, torch, json
        from safetensors.torch import save_file
        save_file({{"w0": torch.randn(96 * 1024 * 1024), "b": torch.randn(32 * 1024 * 1024)}}, {str(path)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    probe = textwrap.dedent(
        f"""
        import resource, json
        import torch
        from ckptscope.formats import open_checkpoint
        from ckptscope.stats.engine import compute_stats
        def rss():
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) * 1024
        base = rss()
        stats = compute_stats(open_checkpoint({str(path)!r}).tensors)
        print(json.dumps({{"base": base, "peak": rss(), "mean": stats["w0"].mean}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    grown = result["peak"] - result["base"]
    assert math.isfinite(result["mean"])
    assert grown < 250 * 1024 * 1024, f"stats of a 512 MiB file grew RSS by {grown / 2**20:.0f} MiB"
