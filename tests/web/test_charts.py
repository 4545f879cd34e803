"""The histogram chart's data (ckptscope/web/charts.py): ticks, bar geometry, log scale, zeros
apart, percentiles from the histogram against numpy.percentile on statistics the real engine made."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ckptscope.formats import open_checkpoint
from ckptscope.stats import HIST_BINS, TensorStats
from ckptscope.stats.engine import compute_stats
from ckptscope.web import charts
from tests import factories as f

QS = [q for _, q in charts.PERCENTILES]


def engine_stats(tmp_path, tensors: dict[str, torch.Tensor]) -> dict[str, TensorStats]:
    path = f.save_safetensors(tensors, tmp_path / "t.safetensors")
    return compute_stats(open_checkpoint(path).tensors)


# --- ticks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "want"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (-3.1141, 3.93, [-2.0, 0.0, 2.0]),
        (-0.0312, 0.0288, [-0.02, 0.0, 0.02]),
        (0.0, 1000.0, [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]),
        (17.0, 18.0, [17.0, 17.2, 17.4, 17.6, 17.8, 18.0]),
    ],
)
def test_nice_ticks_are_round_values_inside_the_range(lo, hi, want):
    assert charts.nice_ticks(lo, hi, 5) == pytest.approx(want)


@given(
    lo=st.floats(-1e12, 1e12, allow_nan=False),
    span=st.floats(1e-9, 1e12, allow_nan=False),
    target=st.integers(3, 6),
)
def test_nice_ticks_properties(lo, span, target):
    hi = lo + span
    assume(span > abs(lo) * 1e-9)  # a range wider than float rounding at its offset
    ticks = charts.nice_ticks(lo, hi, target)
    step = charts.nice_step(hi - lo, target)
    assert 1 <= len(ticks) <= target + 2
    slack = step * 1e-6
    assert all(lo - slack <= t <= hi + slack for t in ticks)
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0, 10.0)
    for a, b in zip(ticks, ticks[1:], strict=False):
        assert b - a == pytest.approx(step, rel=1e-6)
    labels = [charts.tick_label(t, step) for t in ticks]
    assert len(set(labels)) == len(labels), labels  # distinct ticks read differently


def test_tick_and_count_labels():
    assert charts.tick_label(0.0, 0.5) == "0"
    assert charts.tick_label(-0.02, 0.02) == "-0.02"
    assert charts.tick_label(2.0, 2.0) == "2"
    assert charts.tick_label(3e-6, 1e-6) == "3e-6"
    assert charts.tick_label(2e7, 5e6) == "2.0e7"
    assert charts.tick_label(1_000_000.5, 0.5) == "1.0000005e6"
    assert [charts.count_label(n) for n in (0, 950, 1200, 3_000_000, 2_500_000_000)] == [
        "0",
        "950",
        "1.2k",
        "3M",
        "2.5G",
    ]


# --- geometry -----------------------------------------------------------------------------------


def synthetic(hist: list[int], lo: float = -1.0, hi: float = 1.0, zeros: int = 0, nan: int = 0) -> TensorStats:
    return TensorStats(numel=sum(hist) + nan, zeros=zeros, nan=nan, hist=hist, hist_min=lo, hist_max=hi)


def test_bars_tile_the_plot_in_value_order_with_counts_in_titles():
    hist = [i % 7 for i in range(HIST_BINS)]
    chart = charts.bins_chart(synthetic(hist, -2.0, 6.0))
    assert chart is not None and len(chart.bars) == HIST_BINS
    xs = [b.x for b in chart.bars]
    assert xs == sorted(xs) and xs[0] == chart.left
    assert chart.bars[-1].x + chart.bars[-1].w <= chart.right + 1e-6
    for b, count in zip(chart.bars, hist, strict=True):
        assert b.count == count
        assert b.title.endswith(f": {count:,}")
        assert b.y + b.h == pytest.approx(chart.bottom)  # bars stand on the axis
        assert (b.h > 0) == (count > 0)
    assert chart.bars[0].title.startswith("[-2, -1.875)")
    assert chart.bars[-1].title.startswith("[5.875, 6]")  # the last bin is closed
    tallest = max(chart.bars, key=lambda b: b.count)
    assert tallest.h == pytest.approx(chart.bottom - chart.top)
    # value ticks sit where their values are
    for t in chart.x_ticks:
        value = float(t.label)
        assert t.pos == pytest.approx(chart.left + (value + 2) / 8 * (chart.right - chart.left), abs=0.01)


def test_log_scale_lifts_small_bins_and_has_decade_ticks():
    hist = [0] * HIST_BINS
    hist[10], hist[20], hist[30] = 100_000, 10, 1
    linear = charts.bins_chart(synthetic(hist))
    log = charts.bins_chart(synthetic(hist), log=True)
    assert linear is not None and log is not None
    assert linear.bars[10].h == log.bars[10].h == pytest.approx(linear.bottom - linear.top)
    assert linear.bars[20].h == 1.0 and linear.bars[30].h == 1.0  # a non-empty bin is never invisible
    full = log.bottom - log.top
    assert log.bars[20].h == pytest.approx(full * math.log10(11) / math.log10(100_001), abs=0.01)
    assert log.bars[30].h == pytest.approx(full * math.log10(2) / math.log10(100_001), abs=0.01)
    assert log.bars[20].h > 10 * linear.bars[20].h
    assert [t.label for t in log.y_ticks] == ["1", "10", "100", "1k", "10k", "100k"]
    assert [t.label for t in linear.y_ticks] == ["0", "20k", "40k", "60k", "80k", "100k"]
    assert "log count scale" in log.summary


def test_exact_zeros_are_taken_out_of_their_bin_and_drawn_apart():
    hist = [0] * HIST_BINS
    hist[0], hist[31], hist[32], hist[63] = 5, 3, 904, 8  # 900 exact zeros in bin 32 of [-1, 1]
    stats = synthetic(hist, zeros=900)
    assert charts.zero_bin(-1.0, 1.0) == 32
    chart = charts.bins_chart(stats)
    assert chart is not None and chart.zero is not None
    assert chart.bars[32].count == 4
    assert "900 exact zeros" in chart.bars[32].title
    assert chart.zero.bar.count == 900 and chart.zero.label == "0: 900"
    zero_x = chart.zero.bar.x + chart.zero.bar.w / 2
    assert zero_x == pytest.approx((chart.left + chart.right) / 2)  # value 0 is mid-axis
    assert chart.zero.bar.h == pytest.approx(chart.bottom - chart.top)  # the tallest thing
    assert "900 exact zeros shown apart" in chart.summary
    # zeros apart: most percentiles are exactly 0, not smeared over bin 32
    est = dict(chart.estimates)
    assert est["p25"] == est["median"] == est["p75"] == "0"
    assert not any(m.name == "median" for m in chart.percentiles)  # merged into one label
    assert any("median" in m.name.split("/") for m in chart.percentiles)


def test_zero_bin_matches_the_engine_on_edges(tmp_path):
    # 0 exactly on a bin edge: the engines put it in the bin above
    values = torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0, 0.5, -0.5, 0.25])
    stats = engine_stats(tmp_path, {"x": values})["x"]
    z = charts.zero_bin(stats.hist_min, stats.hist_max)
    assert stats.zeros == 3 and stats.hist[z] >= 3
    chart = charts.bins_chart(stats)
    assert chart is not None and chart.zero is not None and chart.bars[z].count == stats.hist[z] - 3


def test_no_histogram_without_finite_values_and_a_constant_is_one_bar():
    nothing = TensorStats(numel=3, nan=3)
    view = charts.histogram_view(nothing)
    assert view.chart is None and view.nan == 3
    const = TensorStats(numel=10, hist=[10] + [0] * (HIST_BINS - 1), hist_min=2.0, hist_max=2.0)
    view = charts.histogram_view(const)
    assert view.chart is not None and view.chart.kind == "values"
    assert [(b.label, b.count) for b in view.chart.bars] == [("2.0", 10)]


def test_values_chart_one_bar_per_distinct_value():
    chart = charts.values_chart([(0, 50), (3, 20), (7, 5)], "int", name="labels")
    assert [b.title for b in chart.bars] == ["0: 50", "3: 20", "7: 5"]
    assert [t.label for t in chart.x_ticks] == ["0", "3", "7"]
    assert chart.bars[0].h > chart.bars[1].h > chart.bars[2].h > 0
    assert chart.bars[0].h == pytest.approx(chart.bottom - chart.top)
    assert "3 distinct values of labels" in chart.summary
    flags = charts.values_chart([(False, 2), (True, 1)], "bool")
    assert [b.label for b in flags.bars] == ["false", "true"]


# --- percentiles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(200_000, generator=g),
        lambda g: torch.rand(100_000, generator=g) * 10 - 3,
        lambda g: torch.empty(150_000).exponential_(2.0, generator=g),  # skewed
        lambda g: torch.randn(300, 400, generator=g) * 0.02,  # an init-like weight
        lambda g: torch.randn(100_000, generator=g) * (torch.rand(100_000, generator=g) < 0.1),  # 90% zeros
    ],
    ids=["normal", "uniform", "exponential", "init", "sparse"],
)
def test_percentiles_from_the_histogram_agree_with_numpy_within_a_bin(tmp_path, make):
    g = torch.Generator().manual_seed(7)
    x = make(g).float()
    stats = engine_stats(tmp_path, {"x": x})["x"]
    width = (stats.hist_max - stats.hist_min) / HIST_BINS
    want = np.percentile(x.double().numpy(), QS)
    for zeros in (0, stats.zeros):  # zeros as a point mass, or spread over their bin
        got = charts.hist_percentiles(stats.hist, stats.hist_min, stats.hist_max, QS, zeros=zeros)
        for q, g_, w in zip(QS, got, want, strict=True):
            assert g_ is not None
            assert abs(g_ - w) <= width, (q, g_, w, width)
    if stats.zeros:
        got = charts.hist_percentiles(stats.hist, stats.hist_min, stats.hist_max, [50], zeros=stats.zeros)
        assert got == [0.0]  # the median of a 90%-sparse tensor is exactly 0


def test_percentiles_interpolate_linearly_within_bins():
    hist = [0] * HIST_BINS
    hist[0], hist[63] = 50, 50
    lo, hi = 0.0, 64.0  # bins one unit wide
    assert charts.hist_percentiles(hist, lo, hi, [0, 25, 50, 75, 100]) == pytest.approx([0.0, 0.5, 1.0, 63.5, 64.0])
    assert charts.hist_percentiles([0] * HIST_BINS, lo, hi, [50]) == [None]


def test_percentile_markers_sit_on_the_value_axis():
    hist = [1] * HIST_BINS
    chart = charts.bins_chart(synthetic(hist, 0.0, 64.0))
    assert chart is not None
    assert [m.name for m in chart.percentiles] == ["p1", "p25", "median", "p75", "p99"]
    plot = chart.right - chart.left
    for m in chart.percentiles:
        assert m.pos == pytest.approx(chart.left + m.value / 64 * plot, abs=0.01)
        assert m.label_y < chart.top
    assert dict(chart.estimates)["median"] == "32"


# --- values ---------------------------------------------------------------------------------------


def test_values_are_formatted_consistently():
    assert charts.format_values([0.5, -1.25, 3.0, 0.0], "float") == ["0.50", "-1.25", "3.00", "0.00"]
    assert charts.format_values([1.0, 2.0], "float") == ["1.0", "2.0"]
    assert charts.format_values([1e-6, 3.0], "float") == ["1.0000e-06", "3.0000e+00"]
    assert charts.format_values([float("nan"), float("inf"), -float("inf"), 0.25], "float") == [
        "NaN",
        "+Inf",
        "-Inf",
        "0.25",
    ]
    assert charts.format_values([3, -2], "int") == ["3", "-2"]
    assert charts.format_values([True, False], "bool") == ["true", "false"]


def test_value_rows_keep_a_small_matrix_a_matrix():
    texts = [str(i) for i in range(12)]
    assert charts.value_rows(texts, (3, 4)) == [texts[0:4], texts[4:8], texts[8:12]]
    assert charts.value_rows(texts, (12,)) == [texts[0:8], texts[8:12]]
    view = charts.histogram_view(synthetic([1] * HIST_BINS), values=[1.5, 2.5], shape=(2,))
    assert view.values == [["1.5", "2.5"]] and view.values_count == 2
