"""The histogram chart of the tensor detail panel, as plain data for an inline SVG.

Pure Python (no browser, no FastAPI, no file reading): ticks, bar geometry, a linear or log count
scale, exact zeros taken out of their bin and shown apart, and percentiles estimated from the
64-bin histogram unless the stats engine measured them exactly (``stats.percentiles``); a second chart
of the values by sign and binary magnitude (``stats.log_hist``): negative magnitudes mirrored on the
left, the zeros in the middle, positive magnitudes on the right. ``templates/histogram.html`` draws
what ``histogram_view`` returns.

The bins are the stats engines' (``ckptscope/stats/walk.py``): 64 equal bins over [hist_min,
hist_max] of the finite values, a value ``x`` in bin ``floor((x - lo) * 64 / (hi - lo))`` clamped
to the last one; a constant tensor puts everything in bin 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptscope.stats import HIST_BINS, TensorStats
from ckptscope.stats.model import PERCENTILES as STATS_PERCENTILES
from ckptscope.stats.model import LogHistogram

# The SVG's user units (the image scales to the panel's width).
WIDTH = 360.0
HEIGHT = 210.0
LEFT, RIGHT, TOP, BOTTOM = 40.0, 10.0, 34.0, 36.0  # margins: count labels, -, percentile labels, value labels
PERCENTILES: tuple[tuple[str, float], ...] = (("p1", 1), ("p25", 25), ("median", 50), ("p75", 75), ("p99", 99))
EXACT_KEYS = {"p1": "1", "p25": "25", "median": "50", "p75": "75", "p99": "99"}  # marks -> stats.percentiles keys
MAX_EXPONENTS = 48  # magnitude chart: binary exponents per side; smaller magnitudes share the lowest slot
LABEL_CHAR = 5.4  # width of one 9px monospace character, in user units
ROW_GAP = 10.0  # vertical distance between two rows of percentile labels


@dataclass(frozen=True, slots=True)
class Tick:
    pos: float  # x (value axis) or y (count axis) in user units
    label: str


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    count: int
    title: str  # the hover text: range (or value) and count
    label: str  # the bin's range or the value, for the table
    side: str = ""  # magnitude chart: "neg" | "zero" | "pos"


@dataclass(frozen=True, slots=True)
class Marker:
    name: str  # "p1" … "p99"
    value: float
    pos: float  # x in user units
    label_y: float  # baseline of its label (staggered so labels do not overlap)
    text: str  # the value, formatted


@dataclass(frozen=True, slots=True)
class ZeroMark:
    """The exact zeros, drawn apart from their bin: a narrow bar at 0 and a "0: N" label."""

    bar: Bar
    label: str
    label_x: float
    label_y: float
    anchor: str  # "start" | "end": the label sits right of the bar, or left of it near the right edge


@dataclass(frozen=True, slots=True)
class Chart:
    kind: str  # "bins" (the 64-bin histogram) | "values" (one bar per distinct value)
    log: bool
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    summary: str  # the SVG's aria-label
    zero: ZeroMark | None = None  # exact zeros, apart from their bin
    percentiles: list[Marker] = field(default_factory=list)  # on the axis (merged where they coincide)
    estimates: list[tuple[str, str]] = field(default_factory=list)  # ("p1", "-0.031"), … for the caption
    exact: bool = False  # the percentile marks are the engine's exact percentiles, not estimates
    x_label: str = ""  # the value axis's title (magnitude chart)
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    top: float = TOP
    right: float = WIDTH - RIGHT
    bottom: float = HEIGHT - BOTTOM


@dataclass(frozen=True, slots=True)
class HistogramView:
    """Everything the detail panel shows below the statistics table."""

    chart: Chart | None
    log: bool
    nan: int
    inf: int
    finite: int
    values: list[list[str]] | None = None  # a tiny tensor's values, formatted, in rows
    values_shape: tuple[int, ...] = ()
    values_count: int = 0
    magnitude: Chart | None = None  # the log-magnitude histogram (stats.log_hist)
    percentiles: list[PercentileRow] | None = None  # exact percentiles (stats.percentiles)
    zero_fraction: float | None = None  # zeros / numel


@dataclass(frozen=True, slots=True)
class PercentileRow:
    key: str  # "0.1" … "99.9" (the stats record's key)
    label: str  # "p0.1" … "p99.9"
    value: float


# --- numbers ---------------------------------------------------------------------------------


def nice_step(span: float, target: int) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about ``target`` intervals."""
    if not span > 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10.0 * mag  # pragma: no cover - the loop always returns


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round values within [lo, hi], a nice step apart (``target`` intervals or a few more)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        return []
    if hi == lo:
        return [lo]
    step = nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    decimals = max(0, 1 - math.floor(math.log10(step)))
    return [0.0 if k == 0 else round(k * step, decimals) for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """A tick value with as many digits as its step needs (so neighbours read differently);
    scientific notation for very large or small values."""
    if value == 0:
        return "0"
    step_exp = math.floor(math.log10(step) + 1e-9)
    if 1e-4 <= step < 1e5 and abs(value) < 1e6:
        return f"{value:.{max(0, -step_exp)}f}"
    digits = max(1, math.floor(math.log10(abs(value))) - step_exp + 1)
    mantissa, _, exp = f"{value:.{digits - 1}e}".partition("e")
    return f"{mantissa}e{int(exp)}"


def count_label(n: float) -> str:
    """A count on the axis: 0, 950, 1.2k, 3M."""
    n = int(round(n))
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= size:
            text = f"{n / size:.3g}"
            return f"{text}{unit}"
    return str(n)


def number(value: float) -> str:
    """One value for titles and captions (as the statistics table writes them)."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.5g}"
    return f"{value:.4e}"


def format_values(values: Sequence[float | int | bool], category: str) -> list[str]:
    """A tiny tensor's values, all in one notation: booleans as true/false, integers as they are,
    floats with one shared number of decimals (or all in scientific notation when their magnitudes
    are too far apart for that); NaN and infinities spelled out."""
    if category == "bool":
        return ["true" if v else "false" for v in values]
    if category in ("int", "uint"):
        return [f"{int(v)}" for v in values]
    floats = [float(v) for v in values]
    finite = [abs(v) for v in floats if math.isfinite(v)]
    nonzero = [v for v in finite if v != 0]

    def special(v: float) -> str:
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")

    if not nonzero:
        return [special(v) if not math.isfinite(v) else "0.0" for v in floats]
    big, small = max(nonzero), min(nonzero)
    if big >= 1e5 or small < 1e-4 or big / small >= 1e5:
        return [f"{v:.4e}" if math.isfinite(v) else special(v) for v in floats]
    decimals = max(1, max(_decimals(f"{v:.5g}") for v in finite))  # five significant digits at most
    return [f"{v:.{decimals}f}" if math.isfinite(v) else special(v) for v in floats]


def _decimals(text: str) -> int:
    return len(text.partition(".")[2])


def value_rows(texts: list[str], shape: tuple[int, ...], per_row: int = 8) -> list[list[str]]:
    """A matrix stays a matrix (2-D, at most 16 columns); anything else wraps ``per_row`` a row."""
    if len(shape) == 2 and 0 < shape[1] <= 16 and shape[0] * shape[1] == len(texts):
        cols = shape[1]
    else:
        cols = per_row
    return [texts[i : i + cols] for i in range(0, len(texts), cols)] or [[]]


# --- the histogram -----------------------------------------------------------------------------


def bin_edges(lo: float, hi: float, bins: int = HIST_BINS) -> list[float]:
    width = (hi - lo) / bins
    return [lo + i * width for i in range(bins)] + [hi]


def zero_bin(lo: float, hi: float, bins: int = HIST_BINS) -> int | None:
    """The bin the stats engines put an exact 0.0 in (None when 0 is outside [lo, hi])."""
    if not lo <= 0.0 <= hi:
        return None
    scale = min(bins / (hi - lo), 1e300) if hi > lo else 0.0
    return min(bins - 1, max(0, int((0.0 - lo) * scale)))


def _segments(hist: Sequence[int], lo: float, hi: float, zeros: int) -> list[tuple[float, float, float]]:
    """(from, to, count) pieces of mass in value order: each bin spread evenly over its range,
    except that its exact zeros are a point mass at 0."""
    edges = bin_edges(lo, hi, len(hist))
    z = zero_bin(lo, hi, len(hist)) if zeros else None
    out: list[tuple[float, float, float]] = []
    for i, count in enumerate(hist):
        a, b = edges[i], edges[i + 1]
        if i != z:
            out.append((a, b, float(count)))
            continue
        at_zero = min(zeros, count)
        rest = float(count - at_zero)
        below = (0.0 - a) / (b - a) if b > a else 0.0
        out += [(a, 0.0, rest * below), (0.0, 0.0, float(at_zero)), (0.0, b, rest * (1 - below))]
    return out


def hist_percentiles(
    hist: Sequence[int], lo: float, hi: float, qs: Sequence[float], zeros: int = 0
) -> list[float | None]:
    """Percentiles (0-100) estimated from a histogram by linear interpolation within the bins (exact
    zeros, when counted apart, are a point mass at 0). None for an empty histogram."""
    segments = _segments(hist, lo, hi, zeros)
    total = sum(c for _, _, c in segments)
    out: list[float | None] = []
    for q in qs:
        if total <= 0:
            out.append(None)
            continue
        target = total * min(max(q, 0.0), 100.0) / 100.0
        cum = 0.0
        found = hi
        for a, b, c in segments:
            if c > 0 and cum + c >= target:
                found = a + (b - a) * max(0.0, target - cum) / c
                break
            cum += c
        out.append(min(max(found, lo), hi))
    return out


class _CountScale:
    """Bar heights for counts, linear or log (log10(1 + n), so a single value still shows)."""

    def __init__(self, top: int, height: float, log: bool) -> None:
        self.top, self.height, self.log = max(top, 0), height, log

    def __call__(self, count: float) -> float:
        if count <= 0 or self.top <= 0:
            return 0.0
        frac = math.log10(1 + count) / math.log10(1 + self.top) if self.log else count / self.top
        return max(1.0, self.height * frac)  # a non-empty bin is never invisible

    def ticks(self) -> list[tuple[float, str]]:
        if self.top <= 0:
            return [(0.0, "0")]
        if self.log:
            values = [10.0**k for k in range(int(math.log10(self.top)) + 1)]  # 0 is the baseline
        else:
            step = max(1.0, nice_step(self.top, 5))
            values = [k * step for k in range(int(self.top // step) + 1)]
        return [(0.0 if v == 0 else self(v), count_label(v)) for v in values]


def _y_ticks(scale: _CountScale, bottom: float) -> list[Tick]:
    return [Tick(round(bottom - h, 2), label) for h, label in scale.ticks()]


def _stagger(markers: list[tuple[str, float, float, str]], top: float) -> list[Marker]:
    """Percentile labels above the plot: markers at the same place share one label ("p25/median"),
    and a label moves up a row (of three) while it would overlap another."""
    merged: list[tuple[str, float, float, str]] = []
    for name, value, pos, text in markers:
        if merged and abs(merged[-1][2] - pos) < 0.5:
            prev = merged[-1]
            merged[-1] = (f"{prev[0]}/{name}", prev[1], prev[2], prev[3])
        else:
            merged.append((name, value, pos, text))
    placed: list[tuple[float, float, int]] = []
    out = []
    for name, value, pos, text in merged:
        half = len(name) * LABEL_CHAR / 2 + 2
        row = 0
        while row < 2 and any(r == row and pos - half < b and pos + half > a for a, b, r in placed):
            row += 1
        placed.append((pos - half, pos + half, row))
        out.append(Marker(name, value, round(pos, 2), top - 4 - row * ROW_GAP, text))
    return out


def exact_marks(stats: TensorStats) -> list[float | None] | None:
    """The chart's percentile marks (p1, p25, median, p75, p99) from the engine's exact percentiles;
    None when it did not measure them (older statistics), and the chart estimates them instead."""
    exact = stats.percentiles
    if not exact or any(EXACT_KEYS[n] not in exact for n, _ in PERCENTILES):
        return None
    out: list[float | None] = []
    for n, _ in PERCENTILES:
        v = exact[EXACT_KEYS[n]]
        out.append(float(v) if v is not None and math.isfinite(v) else None)
    return out


def percentile_rows(stats: TensorStats) -> list[PercentileRow] | None:
    """The exact percentiles of the finite values (0.1 … 99.9), in order; None when not measured."""
    exact = stats.percentiles
    if not exact:
        return None
    rows = [PercentileRow(k, f"p{k}", float(exact[k])) for k in STATS_PERCENTILES if exact.get(k) is not None]
    return rows or None


def zero_fraction(stats: TensorStats) -> float | None:
    """The share of elements equal to zero (NaN and Inf count in the denominator)."""
    return stats.zeros / stats.numel if stats.numel > 0 else None


def bins_chart(stats: TensorStats, *, log: bool = False, name: str = "") -> Chart | None:
    """The 64-bin histogram of ``stats``: bars, value and count ticks, zeros apart, percentiles.
    None when there is no histogram (no finite value) or the range is a single value."""
    lo, hi = stats.hist_min, stats.hist_max
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return None
    hist = [int(c) for c in stats.hist]
    bins = len(hist)
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM
    plot_w, plot_h = right - left, bottom - top

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    z = zero_bin(lo, hi, bins) if stats.zeros else None
    zeros = min(stats.zeros, hist[z]) if z is not None else 0
    shown = list(hist)
    if z is not None:
        shown[z] -= zeros
    scale = _CountScale(max([*shown, zeros]), plot_h, log)
    edges = bin_edges(lo, hi, bins)
    bar_w = plot_w / bins
    gap = min(1.0, bar_w * 0.15)
    bars = []
    for i, count in enumerate(shown):
        a, b = edges[i], edges[i + 1]
        close = "]" if i == bins - 1 else ")"
        label = f"[{number(a)}, {number(b)}{close}"
        title = f"{label}: {count:,}"
        if i == z and zeros:
            title += f" (and {zeros:,} exact zeros, shown apart)"
        h = scale(count)
        bars.append(
            Bar(
                round(left + i * bar_w, 2),
                round(bottom - h, 2),
                round(bar_w - gap, 2),
                round(h, 2),
                count,
                title,
                label,
            )
        )
    zero_mark = None
    if zeros:
        h = scale(zeros)
        zx, zw = x_of(0.0), 3.0
        bar = Bar(round(zx - zw / 2, 2), round(bottom - h, 2), zw, round(h, 2), zeros, f"0: {zeros:,} exact zeros", "0")
        label = f"0: {zeros:,}" if zeros < 100_000 else f"0: {count_label(zeros)}"
        near_right = zx + 6 + len(label) * LABEL_CHAR > right
        label_x = zx - zw if near_right else zx + zw
        zero_mark = ZeroMark(
            bar, label, round(label_x, 2), round(max(bottom - h + 9, top + 9), 2), "end" if near_right else "start"
        )

    step = nice_step(hi - lo, 4)
    x_ticks = [Tick(round(x_of(v), 2), tick_label(v, step)) for v in nice_ticks(lo, hi, 4)]
    total = sum(hist)
    exact = exact_marks(stats)
    values = exact if exact is not None else hist_percentiles(hist, lo, hi, [q for _, q in PERCENTILES], zeros)
    marks = [
        (n, v, x_of(min(max(v, lo), hi)), number(v))
        for (n, _), v in zip(PERCENTILES, values, strict=True)
        if v is not None
    ]
    percentiles = _stagger(marks, top)
    summary = (
        f"Histogram of {name or 'the tensor'}: {total:,} finite values in {bins} bins from {number(lo)} to "
        f"{number(hi)}, {'log' if log else 'linear'} count scale"
    )
    if zeros:
        summary += f"; {zeros:,} exact zeros shown apart"
    if stats.nan or stats.inf:
        summary += f"; {stats.nan:,} NaN and {stats.inf:,} infinite values not counted"
    estimates = [(n, text) for n, _, _, text in marks]
    if estimates:
        summary += ("; median = " if exact is not None else "; median ≈ ") + dict(estimates).get("median", "-")
    return Chart(
        kind="bins",
        log=log,
        bars=bars,
        x_ticks=x_ticks,
        y_ticks=_y_ticks(scale, bottom),
        summary=summary,
        zero=zero_mark,
        percentiles=percentiles,
        estimates=estimates,
        exact=exact is not None,
    )


def values_chart(
    counts: Sequence[tuple[float | int | bool, int]], category: str, *, log: bool = False, name: str = ""
) -> Chart:
    """One bar per distinct value (booleans, integers with few values, a constant tensor)."""
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP - 20, HEIGHT - BOTTOM
    plot_w, plot_h = right - left, bottom - top
    labels = format_values([v for v, _ in counts], category)
    scale = _CountScale(max((c for _, c in counts), default=0), plot_h, log)
    slot = plot_w / max(len(counts), 1)
    w = min(slot * 0.7, 40.0)
    bars, ticks = [], []
    for i, ((_, count), label) in enumerate(zip(counts, labels, strict=True)):
        centre = left + slot * (i + 0.5)
        h = scale(count)
        bars.append(
            Bar(
                round(centre - w / 2, 2),
                round(bottom - h, 2),
                round(w, 2),
                round(h, 2),
                count,
                f"{label}: {count:,}",
                label,
            )
        )
        ticks.append(Tick(round(centre, 2), label))
    total = sum(c for _, c in counts)
    parts = ", ".join(f"{label}: {c:,}" for label, (_, c) in zip(labels, counts, strict=True))
    summary = f"Counts of the {len(counts)} distinct values of {name or 'the tensor'} ({total:,} values): {parts}"
    return Chart(
        kind="values", log=log, bars=bars, x_ticks=ticks, y_ticks=_y_ticks(scale, bottom), summary=summary, top=top
    )


# --- the log-magnitude histogram ----------------------------------------------------------------

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def pow2(e: int, sign: str = "") -> str:
    """A power of two for an axis label: ``2⁻⁸``, ``-2¹⁰``."""
    return f"{sign}2{str(e).translate(_SUPERSCRIPT)}"


def pow2_text(e: int, sign: str = "") -> str:
    """A power of two for titles and screen readers: ``2^-8 (0.0039062)``."""
    return f"{sign}2^{e} ({number(float(sign + '1') * 2.0**e)})"


def _label_step(slot: float, width: float) -> int:
    """Exponents between two labelled ticks, so labels ``width`` wide do not touch."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100):
        if step * slot >= width:
            return step
    return 128


def _spaced(ticks: list[Tick]) -> list[Tick]:
    """The first tick (the zero) and those of the others, innermost first, whose labels do not
    overlap a kept one; in axis order."""
    kept = ticks[:1]
    centre = ticks[0].pos if ticks else 0.0
    for t in sorted(ticks[1:], key=lambda t: abs(t.pos - centre)):
        if all(abs(t.pos - k.pos) >= (len(t.label) + len(k.label)) * LABEL_CHAR / 2 + 2 for k in kept):
            kept.append(t)
    return sorted(kept, key=lambda t: t.pos)


def magnitude_chart(hist: LogHistogram | None, *, log: bool = False, name: str = "") -> Chart | None:
    """The finite values by sign and binary magnitude: one slot per exponent ``e`` (2**e <= |x| <
    2**(e+1)), negative values mirrored on the left (largest magnitudes outermost), the zeros in the
    middle slot, positive values on the right; both sides span the same exponents. Over
    ``MAX_EXPONENTS`` exponents, the smallest magnitudes share the lowest slot. None when empty."""
    if hist is None:
        return None
    total = sum(hist.neg.values()) + hist.zero + sum(hist.pos.values())
    if total <= 0:
        return None
    exps = [*hist.neg, *hist.pos]
    e_hi = max(exps) if exps else 0
    e_lo = min(exps) if exps else 0
    clipped = e_hi - e_lo + 1 > MAX_EXPONENTS
    if clipped:
        e_lo = e_hi - MAX_EXPONENTS + 1

    def merged(side: dict[int, int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for e, c in side.items():
            out[max(e, e_lo)] = out.get(max(e, e_lo), 0) + c
        return out

    neg, pos = merged(hist.neg), merged(hist.pos)
    n = e_hi - e_lo + 1 if exps else 0
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP - 20, HEIGHT - BOTTOM
    plot_w, plot_h = right - left, bottom - top
    slot = plot_w / (2 * n + 1)
    gap = min(1.0, slot * 0.15)
    scale = _CountScale(max([*neg.values(), *pos.values(), hist.zero]), plot_h, log)
    bars: list[Bar] = []

    def bar(index: int, count: int, label: str, side: str) -> None:
        h = scale(count)
        title = f"{label}: {count:,}"
        bars.append(
            Bar(
                round(left + index * slot, 2),
                round(bottom - h, 2),
                round(slot - gap, 2),
                round(h, 2),
                count,
                title,
                label,
                side,
            )
        )

    def bucket(e: int, sign: str) -> str:
        low = f"0 < |x| < {pow2_text(e + 1)}" if clipped and e == e_lo else ""
        if sign:
            return low.replace("|x|", "-x") if low else f"{pow2_text(e + 1, '-')} < x <= {pow2_text(e, '-')}"
        return low.replace("|x|", "x") if low else f"{pow2_text(e)} <= x < {pow2_text(e + 1)}"

    for i, e in enumerate(range(e_hi, e_hi - n, -1)):  # left: -2**e_hi … -2**e_lo
        bar(i, neg.get(e, 0), bucket(e, "-"), "neg")
    bar(n, hist.zero, "exactly 0", "zero")
    for i, e in enumerate(range(e_lo, e_lo + n)):  # right: 2**e_lo … 2**e_hi
        bar(n + 1 + i, pos.get(e, 0), bucket(e, ""), "pos")

    # ticks on slot edges: -2**e on the right edge of its negative slot, 2**e on the left edge of its positive one
    step = _label_step(slot, (len(pow2(e_lo, "-")) + 1) * LABEL_CHAR)
    x_ticks = [Tick(round(left + (n + 0.5) * slot, 2), "0")]
    for e in range(e_lo, e_hi + 2) if exps else ():
        if (e % step) or (clipped and e == e_lo):
            continue
        x_ticks.append(Tick(round(left + (e_hi - e + 1) * slot, 2), pow2(e, "-")))
        x_ticks.append(Tick(round(left + (n + 1 + e - e_lo) * slot, 2), pow2(e)))
    x_ticks = _spaced(x_ticks)

    neg_total, pos_total = sum(neg.values()), sum(pos.values())
    parts = [f"Magnitude histogram of {name or 'the tensor'}: {total:,} finite values by power of two"]
    if neg_total:
        ne = sorted(e for e, c in hist.neg.items() if c)
        parts.append(f"{neg_total:,} negative, magnitudes from 2^{ne[0]} to 2^{ne[-1] + 1}, on the left")
    else:
        parts.append("no negative values")
    parts.append(f"{hist.zero:,} zeros in the middle")
    if pos_total:
        pe = sorted(e for e, c in hist.pos.items() if c)
        parts.append(f"{pos_total:,} positive, from 2^{pe[0]} to 2^{pe[-1] + 1}, on the right")
    else:
        parts.append("no positive values")
    summary = "; ".join(parts) + f"; {'log' if log else 'linear'} count scale"
    if clipped:
        summary += f"; magnitudes below 2^{e_lo + 1} share the innermost slots"
    return Chart(
        kind="magnitude",
        log=log,
        bars=bars,
        x_ticks=x_ticks,
        y_ticks=_y_ticks(scale, bottom),
        summary=summary,
        top=top,
        x_label="−  magnitude (powers of two)  +",
    )


def histogram_view(
    stats: TensorStats,
    *,
    log: bool = False,
    name: str = "",
    category: str = "float",
    distinct: Sequence[tuple[float | int | bool, int]] | None = None,
    values: Sequence[float | int | bool] | None = None,
    shape: tuple[int, ...] = (),
) -> HistogramView:
    """The chart for a tensor: its distinct values when they were counted (few of them), else the
    64-bin histogram; a constant tensor is one bar; a tiny tensor's values come along, formatted."""
    chart: Chart | None
    if distinct:
        chart = values_chart(distinct, category, log=log, name=name)
    else:
        chart = bins_chart(stats, log=log, name=name)
        lo = stats.hist_min
        if chart is None and lo is not None and math.isfinite(lo):  # one value, however many times
            chart = values_chart([(lo, sum(stats.hist))], category, log=log, name=name)
    rows = value_rows(format_values(values, category), shape) if values is not None else None
    return HistogramView(
        chart=chart,
        log=log,
        nan=stats.nan,
        inf=stats.inf,
        finite=sum(stats.hist),
        values=rows,
        values_shape=shape,
        values_count=len(values) if values is not None else 0,
        magnitude=magnitude_chart(stats.log_hist, log=log, name=name),
        percentiles=percentile_rows(stats),
        zero_fraction=zero_fraction(stats),
    )
