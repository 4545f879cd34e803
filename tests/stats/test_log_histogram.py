"""The log-magnitude histogram (``TensorStats.log_hist``) against a brute-force count with
torch.frexp, in every engine (the C kernel, the torch-op engine, batches, stitched tensors), every
dtype, with subnormals, signed zeros, NaN/Inf and expanded views."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.stats.batch import batchable
from ckptscope.stats.engine import compute_stats
from ckptscope.stats.model import LogHistogram, TensorStats
from ckptscope.stats.walk import Buffers, MappedFiles, plan_view
from tests.stats.test_percentiles import ENGINES, engine_named, sprinkle, stats_apart, stitched_dcp

BIG = 30_000  # per-tensor engines
SMALL = 2_000  # batches


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engines compute in: float64 for float64 and the integers, else float32."""
    return torch.float64 if dtype == torch.float64 or not dtype.is_floating_point else torch.float32


def brute(t: torch.Tensor) -> LogHistogram | None:
    """Counts by sign and binary exponent floor(log2|x|) of the finite values, subnormals at the
    smallest normal exponent minus one (of the compute dtype: -127 for float32, -1023 for float64)."""
    dt = compute_dtype(t.dtype)
    x = t.detach().reshape(-1).to(dt)
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return None
    nonzero = x[x != 0]
    exponent = torch.frexp(nonzero).exponent.to(torch.int64) - 1  # x = m * 2**e, 0.5 <= |m| < 1
    floor = -1023 if dt == torch.float64 else -127  # frexp gives a subnormal its true exponent: clamp it
    exponent = torch.clamp(exponent, min=floor)
    pos = Counter(exponent[nonzero > 0].tolist())
    neg = Counter(exponent[nonzero < 0].tolist())
    return LogHistogram(dict(neg), int((x == 0).sum()), dict(pos))


def assert_log_hist(stats: TensorStats, t: torch.Tensor, label: str) -> None:
    want = brute(t)
    got = stats.log_hist
    if want is None:
        assert got is None and stats.to_json()["log_hist"] is None, label
        return
    assert got is not None, label
    assert got.zero == want.zero == stats.zeros, (label, got.zero, want.zero, stats.zeros)
    assert got.pos == want.pos, (label, got.pos, want.pos)
    assert got.neg == want.neg, (label, got.neg, want.neg)
    assert sum(got.pos.values()) + sum(got.neg.values()) + got.zero == stats.numel - stats.nan - stats.inf, label
    assert all(c > 0 for c in (*got.pos.values(), *got.neg.values())), label  # no empty entries
    assert LogHistogram.from_json(got.to_json()) == got, label


def wide(n: int, low: int, high: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Values m * 2**e, 1 <= m < 2, e uniform in [low, high], random signs, a few +0s: no value
    underflows to a signed zero."""
    m = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    e = torch.randint(low, high + 1, (n,), generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (sign * torch.ldexp(m, e)).to(dtype)
    x[::101] = 0.0
    assert not torch.signbit(x[x == 0]).any()
    return x


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(25)
    out: dict[str, torch.Tensor] = {}
    for size, tag in ((BIG, "big"), (SMALL, "small")):
        out[f"f32.{tag}"] = sprinkle(wide(size, -140, 120, torch.float32, g))  # float32 subnormals below -126
        out[f"f16.{tag}"] = sprinkle(wide(size, -24, 14, torch.float16, g))  # float16 subnormals: normal in float32
        out[f"bf16.{tag}"] = sprinkle(wide(size, -133, 120, torch.bfloat16, g))
        out[f"f64.{tag}"] = sprinkle(wide(size, -1070, 1020, torch.float64, g))  # float64 subnormals below -1022
        out[f"f64.narrow.{tag}"] = torch.randn(size, generator=g, dtype=torch.float64)
        out[f"i8.{tag}"] = torch.randint(-128, 128, (size,), generator=g, dtype=torch.int8)
        out[f"i32.{tag}"] = torch.randint(-(2**31), 2**31 - 1, (size,), generator=g, dtype=torch.int32)
        out[f"u8.{tag}"] = torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)
        out[f"bool.{tag}"] = torch.rand(size, generator=g) < 0.4
        out[f"constant.{tag}"] = torch.full((size,), -0.375)
        out[f"zeros.{tag}"] = torch.zeros(size, dtype=torch.bfloat16)
        out[f"negative_zeros_only.{tag}"] = torch.tensor([-0.0, 2.0, -0.0, -5.0] * (size // 4))
        out[f"all_nan.{tag}"] = torch.full((size,), float("nan"))
        out[f"inf_only.{tag}"] = torch.tensor([float("inf"), float("-inf")] * (size // 2), dtype=torch.float16)
    out["one"] = torch.tensor([1.0])
    out["two"] = torch.tensor([-0.5, 3.0], dtype=torch.float64)
    return out


def by_hand() -> dict[str, tuple[torch.Tensor, LogHistogram]]:
    """Tensors with their histograms written out."""
    return {
        "powers": (
            torch.tensor([1.0, 1.5, 2.0, 3.99, 4.0, 0.75, 0.5, -1.0, -3.0, -0.25, 0.0]),
            LogHistogram({0: 1, 1: 1, -2: 1}, 1, {0: 2, 1: 2, 2: 1, -1: 2}),
        ),
        "f32_subnormals": (
            torch.tensor([1e-40, 2.0**-126, 2.0**-127, -1e-45, 2.0**-149]),
            LogHistogram({-127: 1}, 0, {-127: 3, -126: 1}),
        ),
        "f64_subnormals": (
            torch.tensor([5e-324, 2.0**-1022, -(2.0**-1030), 1e308], dtype=torch.float64),
            LogHistogram({-1023: 1}, 0, {-1023: 1, -1022: 1, 1023: 1}),
        ),
        "f16_subnormal": (torch.tensor([2.0**-24, 6e-8], dtype=torch.float16), LogHistogram({}, 0, {-24: 2})),
        "ints": (torch.tensor([0, 1, 2, 3, -128, 127], dtype=torch.int8), LogHistogram({7: 1}, 1, {0: 1, 1: 2, 6: 1})),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple]:
    base = tmp_path_factory.mktemp("loghist")
    plain = cases()
    hand = by_hand()
    save_file(plain | {k: t for k, (t, _) in hand.items()}, base / "plain.safetensors")
    g = torch.Generator().manual_seed(26)
    row = wide(300, -30, 30, torch.float32, g).reshape(1, 300)
    col = wide(50, -1060, 10, torch.float64, g).reshape(50, 1)
    views = {
        "transposed": sprinkle(wide(40_000, -140, 100, torch.float32, g)).reshape(200, 200).T,
        "expanded": row.expand(70, 300),  # factor 70
        "expanded_f64": col.expand(50, 500),  # factor 500
        "sliced": wide(60_000, -20, 20, torch.bfloat16, g).reshape(300, 200)[:, 1::2],
    }
    torch.save(views, base / "views.pt")
    stitched = {
        "w": sprinkle(wide(30_000, -140, 60, torch.float32, g)).reshape(300, 100),
        "f64": wide(9000, -1070, 5, torch.float64, g).reshape(90, 100),
        "i32": torch.randint(-(2**31), 2**31 - 1, (60, 5), generator=g, dtype=torch.int32),
    }
    return {
        "safetensors": (base / "plain.safetensors", plain | {k: t for k, (t, _) in hand.items()}),
        "torch": (base / "views.pt", views),
        "dcp": (stitched_dcp(base / "ck", stitched), stitched),
        "hand": hand,
        "bases": {"expanded": (row, 70), "expanded_f64": (col, 500)},
    }


@pytest.fixture(scope="module", params=ENGINES)
def computed(request, files) -> tuple[str, dict[str, dict[str, TensorStats]]]:
    engine = engine_named(request.param)
    kinds = ("safetensors", "torch", "dcp")
    return request.param, {k: stats_apart(open_checkpoint(files[k][0]).tensors, engine) for k in kinds}


def test_the_brute_force_count_by_hand(files):
    for name, (t, want) in files["hand"].items():
        assert brute(t) == want, name


@pytest.mark.parametrize("kind", ["safetensors", "torch", "dcp"])
def test_log_hist_matches_the_brute_force_count(files, computed, kind):
    engine, stats = computed
    _, tensors = files[kind]
    for name, t in tensors.items():
        assert_log_hist(stats[kind][name], t, f"{engine} {kind} {name}")


def test_by_hand_in_every_engine(files, computed):
    _, stats = computed
    for name, (_, want) in files["hand"].items():
        assert stats["safetensors"][name].log_hist == want, name


def test_the_expansion_factor_multiplies_every_count(files, computed):
    _, stats = computed
    listed = {t.name: t for t in open_checkpoint(files["torch"][0]).tensors}
    for name, (distinct, factor) in files["bases"].items():
        assert plan_view(listed[name]).factor == factor
        once = brute(distinct)
        assert once is not None and once.zero > 0 and once.pos and once.neg
        scaled = LogHistogram(
            {e: c * factor for e, c in once.neg.items()},
            once.zero * factor,
            {e: c * factor for e, c in once.pos.items()},
        )
        assert stats["torch"][name].log_hist == scaled, name


def test_every_engine_gives_the_same_histogram(files, computed):
    """The same tensor through the kernel, the torch-op engine, and (small ones) the batch and a
    per-tensor engine called directly: one LogHistogram."""
    engine, stats = computed
    path, _ = files["safetensors"]
    chosen = engine_named(engine)
    maps = MappedFiles()
    try:
        batched = [t for t in open_checkpoint(path).tensors if batchable(t)]
        assert len(batched) > 15
        for info in batched:
            direct = chosen.per_tensor(maps.get(info.storage.path), info, Buffers())
            assert direct.log_hist == stats["safetensors"][info.name].log_hist, info.name
    finally:
        maps.close()


def test_kernel_and_torch_ops_agree(files):
    for kind in ("safetensors", "torch", "dcp"):
        tensors = open_checkpoint(files[kind][0]).tensors
        a = stats_apart(tensors, engine_named("kernel"))
        b = stats_apart(tensors, engine_named("cpu"))
        assert {n: s.log_hist for n, s in a.items()} == {n: s.log_hist for n, s in b.items()}, kind


SIGNED_ZERO_AND_SUBNORMAL = torch.tensor([0.0, -0.0, 1e-40, 1.0])


def test_signed_zeros_beside_positive_subnormals_in_a_batch(tmp_path):
    t = SIGNED_ZERO_AND_SUBNORMAL.repeat(100)
    save_file({"t": t}, tmp_path / "t.safetensors")
    for engine in ENGINES:
        stats = compute_stats(open_checkpoint(tmp_path / "t.safetensors").tensors, engine=engine_named(engine))["t"]
        assert stats.log_hist == brute(t) == LogHistogram({}, 200, {-127: 100, 0: 100})


@pytest.mark.parametrize("engine", ENGINES)
def test_signed_zeros_beside_positive_subnormals_per_tensor(tmp_path, engine):
    t = SIGNED_ZERO_AND_SUBNORMAL.repeat(6000)
    save_file({"t": t}, tmp_path / "t.safetensors")
    stats = compute_stats(open_checkpoint(tmp_path / "t.safetensors").tensors, engine=engine_named(engine))["t"]
    assert stats.log_hist == brute(t) == LogHistogram({}, 12000, {-127: 6000, 0: 6000})
