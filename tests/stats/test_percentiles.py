"""Exact percentiles (stats/percentiles.py) against torch computed independently: torch.quantile
of the finite values in float64 for tensors up to 1M elements, order statistics from a sort for
bigger ones, in every engine (the C kernel, the torch-op engine, batches of small tensors,
stitched torch.distributed.checkpoint tensors), every dtype and layout, and both ways pass 2
finds the order statistics (the wanted bins' values copied, or counted by their next key bits)."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import TensorInfo
from ckptscope.stats import percentiles as pct
from ckptscope.stats import walk
from ckptscope.stats.batch import SMALL_ELEMENTS, batchable
from ckptscope.stats.engine import Engine, choose_engine, compute_stats
from ckptscope.stats.model import PERCENTILES, TensorStats
from ckptscope.stats.torch_engine import torch_key_counts
from ckptscope.stats.walk import Buffers, MappedFiles
from tests.formats.test_gguf import reference_values, write_gguf

ENGINES = ("kernel", "cpu")
QUANTILES = torch.tensor([0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999], dtype=torch.float64)


def engine_named(name: str) -> Engine:
    """The C kernel (``choose_engine(None)``) or the torch-op engine (``choose_engine("cpu")``)."""
    if name == "kernel":
        chosen = choose_engine()
        assert chosen.name == "kernel", chosen.description  # the test install builds the kernel
        return chosen
    return choose_engine("cpu")


def stats_apart(tensors: Sequence[TensorInfo], engine: Engine) -> dict[str, TensorStats]:
    """compute_stats of a listing, each tensor a per-tensor engine takes in a call of its own (the
    small ones batched together): until the collection buffer bug
    (test_one_pass_over_a_float32_then_a_float64_tensor) is fixed, a worker thread that walks a
    float32 tensor and then a float64 one may fail."""
    small = [t for t in tensors if batchable(t)]
    out = compute_stats(small, engine=engine) if small else {}
    for t in tensors:
        if not batchable(t):
            out |= compute_stats([t], engine=engine)
    return out


def finite64(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().reshape(-1).to(torch.float64)
    return x[torch.isfinite(x)]


def reference(t: torch.Tensor) -> list[float] | None:
    """torch.quantile (linear interpolation) of the finite values in float64."""
    x = finite64(t)
    return None if x.numel() == 0 else torch.quantile(x, QUANTILES).tolist()


def assert_percentiles(stats: TensorStats, want: list[float] | None, label: str, scale: float | None = None) -> None:
    if want is None:
        assert stats.percentiles is None, label
        return
    assert stats.percentiles is not None, label
    assert tuple(stats.percentiles) == PERCENTILES, label
    got = [stats.percentiles[k] for k in PERCENTILES]
    big = scale if scale is not None else max(abs(v) for v in want)
    for key, g, w in zip(PERCENTILES, got, want, strict=True):
        assert isinstance(g, float) and math.isfinite(g), (label, key, g)
        assert g == pytest.approx(w, rel=1e-12, abs=1e-12 * big), (label, key, g, w)
    assert got == sorted(got), label
    json.dumps(stats.to_json(), allow_nan=False)


def sprinkle(t: torch.Tensor, every: int = 997) -> torch.Tensor:
    """NaN, +Inf and -Inf mixed into a float tensor."""
    t = t.clone()
    flat = t.view(-1)
    flat[::every] = float("nan")
    flat[5::every] = float("inf")
    flat[11::every] = float("-inf")
    return t


FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
INTS = {"int8": torch.int8, "int32": torch.int32, "uint8": torch.uint8}
BIG = 40_000  # per-tensor engines
SMALL = 3_000  # batches


def dtype_cases() -> dict[str, torch.Tensor]:
    """Tensors of every dtype and shape of distribution, big (per-tensor engines) and small
    (batches)."""
    g = torch.Generator().manual_seed(15)
    out: dict[str, torch.Tensor] = {}
    for name, dt in FLOATS.items():
        huge = 6e4 if dt == torch.float16 else 1e30
        for size, tag in ((BIG, "big"), (SMALL, "small")):
            out[f"{name}.{tag}.random"] = sprinkle(torch.randn(size, generator=g) * 3 + 1).to(dt)
            out[f"{name}.{tag}.constant"] = torch.full((size,), 0.75, dtype=dt)
            ties = torch.randint(-128, 128, (size,), generator=g).to(torch.float64) * 0.0125  # dequantized int8
            out[f"{name}.{tag}.ties"] = ties.to(dt)
            heavy = torch.randn(size, generator=g)
            heavy[size // 3] = huge
            out[f"{name}.{tag}.heavy"] = heavy.to(dt)
            out[f"{name}.{tag}.all_nan"] = torch.full((size,), float("nan"), dtype=dt)
            out[f"{name}.{tag}.nan_and_inf_only"] = sprinkle(torch.full((size,), float("nan")), 3).to(dt)
        out[f"{name}.one"] = torch.tensor([-2.5], dtype=dt)
        out[f"{name}.two"] = torch.tensor([3.0, -1.0], dtype=dt)
        out[f"{name}.two_with_nan"] = torch.tensor([float("nan"), 7.0, float("inf")], dtype=dt)
        out[f"{name}.signed_zeros"] = torch.tensor([0.0, -0.0, 1.0, -1.0] * 5000, dtype=dt)
    for name, dt in INTS.items():
        info = torch.iinfo(dt)
        for size, tag in ((BIG, "big"), (SMALL, "small")):
            out[f"{name}.{tag}.random"] = torch.randint(info.min, info.max, (size,), generator=g, dtype=dt)
            out[f"{name}.{tag}.constant"] = torch.full((size,), 7, dtype=dt)
            out[f"{name}.{tag}.ties"] = torch.randint(0, 4, (size,), generator=g, dtype=dt)
            heavy = torch.zeros(size, dtype=dt)
            heavy[size // 2] = info.max
            out[f"{name}.{tag}.heavy"] = heavy
        out[f"{name}.one"] = torch.tensor([5], dtype=dt)
        out[f"{name}.two"] = torch.tensor([info.max, info.min], dtype=dt)
    for size, tag in ((BIG, "big"), (SMALL, "small")):
        out[f"bool.{tag}.random"] = torch.rand(size, generator=g) > 0.3
        out[f"bool.{tag}.constant"] = torch.ones(size, dtype=torch.bool)
    out["bool.one"] = torch.tensor([True])
    out["bool.two"] = torch.tensor([False, True])
    # a million elements (the exactness bound) and more than one walk chunk
    out["float32.million"] = sprinkle(torch.randn(1000, 1000, generator=g) * 0.02)
    out["float64.million"] = torch.randn(1_000_000, generator=g, dtype=torch.float64).exp()
    out["bfloat16.million"] = torch.randn(1_000_000, generator=g).bfloat16()
    out["float32.two_chunks"] = torch.randn(walk.CHUNK_ELEMENTS + 1234, generator=g)
    return out


def view_cases() -> dict[str, torch.Tensor]:
    """Views as torch.save keeps them: transposed, expanded (stride 0), sliced."""
    g = torch.Generator().manual_seed(16)
    base = sprinkle(torch.randn(300, 200, generator=g))
    row = torch.randn(1, 400, generator=g)
    row[0, 7] = float("nan")
    return {
        "transposed": base.T,
        "transposed_bf16": torch.randn(200, 150, generator=g).bfloat16().T,
        "expanded": row.expand(120, 400),
        "expanded_small": torch.randn(1, 30, generator=g).expand(20, 30),  # stride 0: never batched
        "sliced": base[:, ::3],
        "small_transposed": torch.randn(40, 30, generator=g).T,
    }


def stitched_dcp(out: Path, tensors: dict[str, torch.Tensor], pieces: int = 3) -> Path:
    """A torch.distributed.checkpoint set whose tensors are stitched from ``pieces`` chunks (by
    rows), saved by one process: the chunks are saved as tensors of their own, then ``.metadata``
    names them as the chunks of one tensor (what a sharded save writes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        parts = {f"{n}.__piece{i}": p.clone() for n, t in tensors.items() for i, p in enumerate(t.chunk(pieces))}
        dcp.save(parts, checkpoint_id=out)
    md_path = out / ".metadata"
    md = pickle.loads(md_path.read_bytes())
    for name, whole in tensors.items():
        chunks = []
        row = 0
        properties = None
        for i, part in enumerate(whole.chunk(pieces)):
            fqn = f"{name}.__piece{i}"
            properties = md.state_dict_metadata.pop(fqn).properties
            offsets = torch.Size([row] + [0] * (whole.dim() - 1))
            chunks.append(ChunkStorageMetadata(offsets, part.size()))
            origin = MetadataIndex(fqn, torch.Size([0] * whole.dim()))
            md.storage_data[MetadataIndex(name, offsets)] = md.storage_data.pop(origin)
            row += part.shape[0]
        md.state_dict_metadata[name] = TensorStorageMetadata(properties, whole.size(), chunks)
    md_path.write_bytes(pickle.dumps(md))
    full = out.parent / f"{out.name}.full.pt"
    dcp_to_torch_save(out, full)  # what torch.distributed.checkpoint itself loads: the tensors given
    for name, value in torch.load(full, weights_only=True).items():
        torch.testing.assert_close(value, tensors[name], rtol=0, atol=0, equal_nan=True)
    return md_path


def dcp_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    ties = (torch.randint(-128, 128, (90, 100), generator=g) * 0.5).to(torch.float32)
    return {
        "w": sprinkle(torch.randn(300, 70, generator=g)),
        "bf": torch.randn(90, 40, generator=g).bfloat16(),
        "f64": torch.randn(60, 500, generator=g, dtype=torch.float64),
        "ties": ties,
        "i32": torch.randint(-1000, 1000, (30, 9), generator=g, dtype=torch.int32),
        "small": torch.randn(9, 4, generator=g),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    base = tmp_path_factory.mktemp("percentiles")
    plain = dtype_cases()
    save_file(plain, base / "plain.safetensors")
    views = view_cases()
    torch.save(views, base / "views.pt")
    stitched = dcp_cases()
    return {
        "safetensors": (base / "plain.safetensors", plain),
        "torch": (base / "views.pt", views),
        "dcp": (stitched_dcp(base / "ck", stitched), stitched),
    }


@pytest.fixture(scope="module", params=ENGINES)
def computed(request, files) -> tuple[str, dict[str, dict[str, TensorStats]]]:
    engine = engine_named(request.param)
    out = {}
    for kind, (path, _) in files.items():
        out[kind] = stats_apart(open_checkpoint(path).tensors, engine)
    return request.param, out


def test_the_percentile_keys_are_the_issues():
    assert PERCENTILES == ("0.1", "1", "5", "25", "50", "75", "95", "99", "99.9")
    assert pct.QUANTILES == pytest.approx(tuple(QUANTILES.tolist()), rel=1e-15)


def test_the_quantiles_are_the_decimal_percentages():
    assert pct.QUANTILES == tuple(QUANTILES.tolist())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [1001, 20001])  # a batch, a per-tensor engine
def test_the_999th_percentile_at_a_whole_rank_is_that_order_statistic(tmp_path, engine, n):
    """0.999 * (n - 1) is a whole rank r: the value there, whatever the values above it."""
    rank = round(0.999 * (n - 1))
    x = torch.arange(n, dtype=torch.float64)
    x[rank + 1 :] = 1e30
    save_file({"x": x}, tmp_path / "x.safetensors")
    stats = compute_stats(open_checkpoint(tmp_path / "x.safetensors").tensors, engine=engine_named(engine))["x"]
    assert stats.percentiles is not None
    assert stats.percentiles["99.9"] == float(torch.quantile(x, QUANTILES)[-1]) == rank


def test_the_fixture_goes_through_every_path(files):
    """Small tensors are batched, big ones and views are not, the DCP set's tensors are stitched."""
    listed = {t.name: t for t in open_checkpoint(files["safetensors"][0]).tensors}
    assert batchable(listed["float32.small.random"]) and not batchable(listed["float32.big.random"])
    assert listed["float32.small.random"].numel <= SMALL_ELEMENTS < listed["float32.big.random"].numel
    views = {t.name: t for t in open_checkpoint(files["torch"][0]).tensors}
    assert {n for n, t in views.items() if batchable(t)} == {"small_transposed"}  # dense, in another order
    assert walk.plan_view(views["expanded"]).factor == 120 and not walk.plan_view(views["sliced"]).dense
    stitched = open_checkpoint(files["dcp"][0]).tensors
    assert all(len(t.pieces) == 3 for t in stitched)


@pytest.fixture(scope="module")
def references(files) -> dict[str, dict[str, list[float] | None]]:
    return {kind: {name: reference(t) for name, t in tensors.items()} for kind, (_, tensors) in files.items()}


@pytest.mark.parametrize("kind", ["safetensors", "torch", "dcp"])
def test_percentiles_equal_torch_quantile(references, computed, kind):
    engine, stats = computed
    for name, want in references[kind].items():
        assert_percentiles(stats[kind][name], want, f"{engine} {kind} {name}")


def test_special_cases_by_hand(computed):
    _, stats = computed
    s = stats["safetensors"]
    for dt in FLOATS:
        assert s[f"{dt}.one"].percentiles == dict.fromkeys(PERCENTILES, -2.5)
        assert s[f"{dt}.two_with_nan"].percentiles == dict.fromkeys(PERCENTILES, 7.0)
        two = s[f"{dt}.two"].percentiles
        assert two is not None and two["0.1"] == pytest.approx(-1 + 0.001 * 4) and two["50"] == 1.0
        for tag in ("big", "small"):
            assert s[f"{dt}.{tag}.constant"].percentiles == dict.fromkeys(PERCENTILES, 0.75)
            assert s[f"{dt}.{tag}.all_nan"].percentiles is None
            assert s[f"{dt}.{tag}.nan_and_inf_only"].percentiles is None
            assert s[f"{dt}.{tag}.all_nan"].to_json()["percentiles"] is None
            heavy = s[f"{dt}.{tag}.heavy"].percentiles
            assert heavy is not None and heavy["99.9"] < 5  # one outlier moves no percentile
    assert s["bool.two"].percentiles == pytest.approx({k: float(k) / 100 for k in PERCENTILES}, rel=1e-15)
    assert s["uint8.big.heavy"].percentiles == dict.fromkeys(PERCENTILES, 0.0)


def test_per_tensor_engines_on_small_tensors_match_the_batch(files, references, computed):
    """A small tensor gives the same percentiles through the batch and through a per-tensor
    engine called directly."""
    engine, stats = computed
    path = files["safetensors"][0]
    chosen = engine_named(engine)
    maps = MappedFiles()
    try:
        for info in open_checkpoint(path).tensors:
            if not batchable(info):
                continue
            direct = chosen.per_tensor(maps.get(info.storage.path), info, Buffers())
            batched = stats["safetensors"][info.name].percentiles
            assert_percentiles(direct, references["safetensors"][info.name], f"{engine} direct {info.name}")
            if batched is None:
                assert direct.percentiles is None, info.name
                continue
            assert direct.percentiles is not None, info.name
            for key in PERCENTILES:
                assert direct.percentiles[key] == pytest.approx(batched[key], rel=1e-12, abs=1e-300), info.name
    finally:
        maps.close()


# --- beyond a million elements: the accuracy contract --------------------------------------------


def order_statistic_bounds(t: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """For each percentile: the true order statistics at ranks q - 0.1% and q + 0.1% of the
    finite values, and the exact (interpolated) value."""
    x = finite64(t).sort().values
    n = x.numel()
    lows, highs, exact = [], [], []
    for q, engines_q in zip(QUANTILES.tolist(), pct.QUANTILES, strict=True):
        lows.append(float(x[max(0, math.floor((q - 0.001) * (n - 1)))]))
        highs.append(float(x[min(n - 1, math.ceil((q + 0.001) * (n - 1)))]))
        pos = engines_q * (n - 1)  # bit-exact with the engines' own q
        lo = math.floor(pos)
        a, b = float(x[lo]), float(x[min(lo + 1, n - 1)])
        frac = pos - lo
        exact.append(a if frac == 0.0 or a == b else a + frac * (b - a))
    return lows, highs, exact


BIG_N = 3_000_000


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, tuple[list[float], ...]]]:
    g = torch.Generator().manual_seed(18)
    heavy = torch.randn(BIG_N, generator=g, dtype=torch.float64) * 1e-3
    heavy[::100_000] = 1e200  # a heavy tail
    heavy[1::100_000] = float("nan")
    tensors = {
        "f32": sprinkle(torch.randn(BIG_N, generator=g), 100_003),
        "f64": heavy,
        "bf16": torch.randn(BIG_N, generator=g).bfloat16(),  # ties: 3M values, a few thousand distinct
    }
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file(tensors, path)
    return path, tensors, {k: order_statistic_bounds(v) for k, v in tensors.items()}


def assert_within_contract(stats: TensorStats, bounds: tuple[list[float], ...], label: str, exact: bool) -> None:
    lows, highs, want = bounds
    assert stats.percentiles is not None, label
    for key, lo, hi, w in zip(PERCENTILES, lows, highs, want, strict=True):
        got = stats.percentiles[key]
        assert lo <= got <= hi, (label, key, lo, got, hi)
        if exact:
            assert got == w, (label, key, got, w)


def spy_plans(monkeypatch, collect_limit: int | None = None) -> list[pct.RankPlan]:
    """Records every rank plan the engines make (``collect_limit``: the limit they plan with)."""
    plans: list[pct.RankPlan] = []
    limit = pct.COLLECT_VALUES if collect_limit is None else collect_limit

    def planned(*args, **kwargs):
        plan = pct.plan_ranks(*args, collect_limit=limit)
        if plan is not None:
            plans.append(plan)
        return plan

    monkeypatch.setattr(walk, "plan_ranks", planned)
    return plans


@pytest.mark.parametrize("engine", ENGINES)
def test_big_tensors_keep_the_accuracy_contract(big_file, engine, monkeypatch):
    """Each value between the order statistics at q -/+ 0.1%; exact where the wanted bins' values
    fit (every tensor here, float64 included) and for every float32 computation."""
    path, _, bounds = big_file
    plans = spy_plans(monkeypatch)
    stats = stats_apart(open_checkpoint(path).tensors, engine_named(engine))
    assert len(plans) == 3 and all(p.collect for p in plans)
    for name in ("f32", "f64", "bf16"):
        assert_within_contract(stats[name], bounds[name], f"{engine} {name}", exact=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_counted_fallback_is_exact_for_float32_and_within_the_contract_for_float64(big_file, engine, monkeypatch):
    """Where the wanted bins' values do not fit, pass 2 counts them by their next 16 key bits:
    a float32 value is pinned exactly, a float64 one to a relative 2**-21."""
    path, tensors, bounds = big_file
    plans = spy_plans(monkeypatch, collect_limit=1000)
    stats = stats_apart(open_checkpoint(path).tensors, engine_named(engine))
    assert len(plans) == 3 and not any(p.collect for p in plans)
    assert_within_contract(stats["f32"], bounds["f32"], f"{engine} f32", exact=True)
    assert_within_contract(stats["bf16"], bounds["bf16"], f"{engine} bf16", exact=True)
    assert_within_contract(stats["f64"], bounds["f64"], f"{engine} f64", exact=False)
    got = stats["f64"].percentiles
    assert got is not None
    for key, want in zip(PERCENTILES, bounds["f64"][2], strict=True):
        assert got[key] == pytest.approx(want, rel=2**-20), key
    assert tensors["f64"].dtype == torch.float64


@pytest.mark.parametrize("engine", ENGINES)
def test_counted_fallback_on_every_path(files, engine, monkeypatch):
    """A small limit on views and stitched tensors: float32 computations (every dtype but float64
    and the integers) stay exact, float64 ones within a relative 2**-20."""
    plans = spy_plans(monkeypatch, collect_limit=10)
    chosen = engine_named(engine)
    for kind in ("torch", "dcp"):
        path, tensors = files[kind]
        stats = stats_apart(open_checkpoint(path).tensors, chosen)
        for name, t in tensors.items():
            want = reference(t)
            label = f"{engine} counted {kind} {name}"
            if t.dtype in (torch.float64, torch.int32):
                got = stats[name].percentiles
                assert got is not None and want is not None
                for key, w in zip(PERCENTILES, want, strict=True):
                    assert got[key] == pytest.approx(w, rel=2**-20, abs=1e-300), (label, key)
            else:
                assert_percentiles(stats[name], want, label)
    counted = [p for p in plans if not p.collect]
    assert len(counted) >= 8 and all(p.wanted > 10 for p in counted)


def test_plan_ranks_says_what_pass_2_gathers():
    x = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf")], dtype=torch.float32)
    counts = pct.new_key_counts()
    counts += torch_key_counts(x)  # every key, NaN and Inf bins included: they are not counted
    plan = pct.plan_ranks(counts, 1, False)
    assert plan is not None and plan.total == 3 and plan.collect
    assert plan.ranks == [0, 1, 2] and plan.wanted == 3
    assert pct.plan_ranks(counts, 1, False, collect_limit=2) is not None
    assert not pct.plan_ranks(counts, 1, False, collect_limit=2).collect  # type: ignore[union-attr]
    assert pct.plan_ranks(pct.new_key_counts(), 1, False) is None
    resolved = plan.resolve_collected(np.array([3.0, 1.0, 2.0]))
    assert resolved is not None and resolved["50"] == 2.0 and resolved["0.1"] == pytest.approx(1.002)
    assert plan.resolve_collected(np.array([1.0, 2.0])) is None  # not what pass 1 counted
    sub = plan.sub_counts()
    assert plan.resolve_counted(sub) is None  # nothing counted: the file changed between the passes
    # an expansion factor: the logical tensor is each distinct value 4 times
    expanded = pct.plan_ranks(counts, 4, False)
    assert expanded is not None and expanded.total == 12
    values = expanded.resolve_collected(np.array([1.0, 2.0, 3.0]))
    want = torch.quantile(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).repeat_interleave(4), QUANTILES)
    assert values is not None and [values[k] for k in PERCENTILES] == pytest.approx(want.tolist(), rel=1e-12)


# --- quantized tensors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(19)
    scales = torch.rand(64, generator=g, dtype=torch.float64) * 0.1 + 0.01
    zero_points = torch.randint(-5, 5, (64,), generator=g)
    warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)  # deprecated, still saved
    q = {
        "per_tensor": torch.quantize_per_tensor(torch.randn(200, 100, generator=g), 0.05, 3, torch.qint8),
        "per_tensor_u8": torch.quantize_per_tensor(torch.rand(30_000, generator=g) * 4, 0.02, 10, torch.quint8),
        "per_tensor_small": torch.quantize_per_tensor(torch.randn(50, generator=g), 0.1, 0, torch.qint8),
        "per_channel": torch.quantize_per_channel(
            torch.randn(64, 300, generator=g), scales, zero_points, 0, torch.qint8
        ),
        "per_channel_small": torch.quantize_per_channel(
            torch.randn(64, 3, generator=g), scales, zero_points, 0, torch.qint8
        ),
    }
    path = tmp_path_factory.mktemp("quantized") / "q.pt"
    torch.save(q, path)
    return path, q


def dequantized64(q: torch.Tensor) -> torch.Tensor:
    """x = (q - zero_point) * scale, in float64 (torch's own dequantize rounds to float32)."""
    ints = q.int_repr().to(torch.float64)
    if q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return (ints - q.q_zero_point()) * q.q_scale()
    shape = [1] * q.dim()
    shape[q.q_per_channel_axis()] = -1
    scales = q.q_per_channel_scales().to(torch.float64).view(shape)
    zero_points = q.q_per_channel_zero_points().to(torch.float64).view(shape)
    return (ints - zero_points) * scales


@pytest.mark.parametrize("engine", ENGINES)
def test_quantized_tensors_have_the_percentiles_of_their_values(quantized_file, engine):
    path, tensors = quantized_file
    listed = open_checkpoint(path).tensors
    assert all(t.quant is not None for t in listed)
    stats = stats_apart(listed, engine_named(engine))
    for name, q in tensors.items():
        assert stats[name].note is None, stats[name].note
        values = dequantized64(q)
        torch.testing.assert_close(values.float(), q.dequantize(), rtol=1e-6, atol=1e-6)
        assert_percentiles(stats[name], reference(values), f"{engine} {name}")


@pytest.mark.parametrize("engine", ENGINES)
def test_gguf_tensors_have_the_percentiles_of_their_decoded_values(tmp_path, engine):
    path = write_gguf(
        tmp_path / "m.gguf",
        [
            ("blk.0.attn_q.weight", "Q8_0", (64, 512)),
            ("blk.0.attn_k.weight", "Q4_0", (8, 256)),
            ("blk.0.ffn_up.weight", "Q6_K", (4, 512)),
            ("blk.0.attn_norm.weight", "F32", (40_000,)),
            ("blk.0.ffn_norm.weight", "F16", (300,)),
            ("output_norm.weight", "F64", (64,)),
        ],
        seed=3,
    )
    values = reference_values(path)
    stats = stats_apart(open_checkpoint(path).tensors, engine_named(engine))
    for name, v in values.items():
        assert stats[name].note is None, (name, stats[name].note)
        assert_percentiles(stats[name], reference(torch.from_numpy(np.array(v))), f"{engine} {name}")


def test_pieced_stats_called_directly(tmp_path):
    """pieced.py with the kernel and with the torch-op fallback."""
    from ckptscope.stats.pieced import pieced_stats

    path = stitched_dcp(tmp_path / "ck", {"w": torch.arange(40.0).reshape(20, 2)}, pieces=2)
    info = open_checkpoint(path).tensors[0]
    maps = MappedFiles()
    try:
        for engine in ("kernel", "torch-fallback"):
            run = partial(pieced_stats, info, maps.get, engine=engine)
            assert_percentiles(run(), reference(torch.arange(40.0)), engine)
    finally:
        maps.close()


def test_one_pass_over_a_float32_then_a_float64_tensor(tmp_path):
    save_file({"c": torch.full((100_000,), 0.5), "d": torch.randn(20_000, dtype=torch.float64)}, tmp_path / "a.st")
    tensors = open_checkpoint(tmp_path / "a.st").tensors
    try:
        stats = compute_stats(tensors, engine=engine_named("kernel"), workers=1)  # c, then d, on one thread
    except ValueError as exc:
        failure = str(exc)
    else:
        failure = ""
    # raised afresh: the engine's frames hold chunks viewing the file mapping compute_stats has
    # closed, and pytest's traceback repr of them would crash the process
    if failure:
        raise ValueError(failure)
    assert_percentiles(stats["d"], reference(load_file(tmp_path / "a.st")["d"]), "d")


def test_a_reused_collection_buffer_fits_the_next_dtype():
    """The bug above at the level of RankPlan: a buffer reused for float64 values holds whole ones."""
    counts = pct.new_key_counts()
    counts += torch_key_counts(torch.full((10,), 0.5))
    f32 = pct.plan_ranks(counts, 1, False)
    assert f32 is not None and f32.wanted == 10
    buffer = f32.collect_buffer()
    assert len(buffer) >= 11 * 4
    counts64 = pct.new_key_counts()
    counts64 += torch_key_counts(torch.tensor([0.5, 0.25], dtype=torch.float64))
    f64 = pct.plan_ranks(counts64, 1, True)
    assert f64 is not None and f64.wanted == 2
    reused = f64.collect_buffer(buffer)
    assert len(reused) >= 3 * 8
    assert len(reused) % 8 == 0
