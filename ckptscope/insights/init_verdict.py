"""Does a tensor still look like its initialisation, or has it moved away from it (trained)?

``init_verdict`` compares a tensor's statistics (mean, std, min, max, zeros and, where the stats
engine measured them, the percentiles) with the laws that model code initialises weights from,
each with its scale fixed by the tensor's shape:

- PyTorch's default ``Linear``/``ConvNd`` weight ``kaiming_uniform_(a=sqrt(5))``, i.e.
  U(±1/sqrt(fan_in)); ``kaiming_uniform_``/``kaiming_normal_`` (fan_in and fan_out modes, relu and
  linear gains); ``xavier_uniform_``/``xavier_normal_``; RNN/LSTM/GRU weights U(±1/sqrt(hidden));
  ``uniform_(±1/sqrt(fan_out))``; a 1-D bias U(±b) (its fan_in is not in its shape: b is fitted);
- ``normal_(0, σ)`` and ``trunc_normal_(std=σ)`` (timm's, truncated at ±2: the same law) for the σ
  model code uses: transformers' ``initializer_range`` 0.02 (BERT, GPT-2, Llama, OPT, Bloom, ViT …),
  0.01, 0.001, 1e-6, ``Embedding``'s N(0, 1); GPT-2's 0.02/sqrt(2·n_layer) on residual projections
  (``RESIDUAL_PROJECTIONS``); T5's fan_in^-0.5 (k, v, o, wi, wo), (d_model·d_kv)^-0.5 (q) and
  d_model^-0.5 (relative_attention_bias); ``trunc_normal_(std=0.02, a=-0.04, b=0.04)``;
- constants: norm weights ``ones``, biases and zero-initialised layers ``zeros``, any other constant.

Fan-in and fan-out follow torch's ``_calculate_fan_in_and_fan_out`` on the shape: Linear
``[out, in]``, Conv ``[out, in, *k]`` (fan_in = in·prod(k), fan_out = out·prod(k)), Embedding
``[num, dim]``; transformers' ``Conv1D`` (``module_type="Conv1D"``) stores ``[in, out]``.

Every comparison is a check in units of its own standard error for the tensor's numel ``n`` under
the candidate law, so the tolerance shrinks as 1/sqrt(n):

- each percentile q: |F(x_q) - q| / sqrt(q(1-q)/n), F the candidate's CDF (distribution free;
  in the tails, q <= 5% or >= 95%, n·F(x_q) is Gamma(rank) and goes through the Wilson-Hilferty
  cube root); allowing 1/n for interpolation, the zero fraction (a zeroed padding row shifts every
  rank by at most that), the dtype's rounding of x_q, and the engine's ±0.1% rank contract beyond
  2**20 elements;
- all percentiles jointly: the chi-square of the masses F puts between consecutive percentiles;
- min and max: n·F(min) and n·(1 - F(max)) are Exp(1) under the law; the two-sided p-value is
  turned into a normal z (a uniform's bound that is exceeded gives a huge z);
- mean: |mean| / (σ/sqrt(n)); std: |s/σ - 1| / sqrt((κ - 1)/(4n)) (κ the law's kurtosis), less the
  dtype's rounding and the zero fraction;
- zeros: at most one row of exact zeros (an ``Embedding``'s ``padding_idx``).

**score** is the largest of these z values for the best candidate (the candidate whose largest z is
smallest), i.e. how many standard errors the tensor is away from the closest initialiser in its
worst statistic: 0 for an exact constant, a few for a fresh init, hundreds or more for a trained
weight. ``init`` when score <= ``INIT_SCORE`` (6: a fresh init exceeds it with probability far
below 1e-6 per tensor), else ``trained``; ``matches`` then names the nearest initialiser it moved
away from. ``unknown`` (score None): no stats, buffers, non-float dtypes, scalars, NaN/Inf values,
and non-constant tensors of fewer than ``MIN_NUMEL`` elements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Literal

from ckptscope.formats.model import TensorInfo
from ckptscope.stats.model import PERCENTILES, TensorStats

Verdict = Literal["init", "trained", "unknown"]

INIT_SCORE = 6.0
"""The largest score still called "init" (standard errors in the worst statistic)."""
MIN_NUMEL = 64
"""Fewer elements than this (and not constant): "unknown"."""
QUANTILE_TAIL = 50
"""A bulk percentile q (5% < q < 95%) is checked where n·min(q, 1-q) >= this (normal approximation)."""
JOINT_RANK = 20.0
"""A percentile joins the joint (chi-square) check where n·min(q, 1-q) is at least this."""
TAIL_LEVEL = 0.05
TAIL_RANK = 5.0
"""A tail percentile is checked where its rank from the nearer end, n·min(q, 1-q), is at least this."""
EXACT_PERCENTILES_UP_TO = 1 << 20
"""The stats engine's percentiles are exact up to this many elements, within ±0.1% rank beyond."""
RANK_SLACK = 0.001
Z_CAP = 1e6
"""Scores are capped here (a value the candidate law cannot produce at all)."""

_LEVELS: tuple[tuple[str, float], ...] = tuple((k, float(k) / 100.0) for k in PERCENTILES)
_NORMAL = NormalDist()
_SQRT2 = math.sqrt(2.0)
_LN2 = math.log(2.0)


@dataclass(frozen=True, slots=True)
class InitVerdict:
    """Whether a tensor still looks like an initialiser (see the module docstring for the score)."""

    verdict: Verdict
    matches: str | None  # the best-matching initialiser and its parameters (the nearest one if trained)
    score: float | None  # standard errors from it in the worst statistic; lower = closer; None if unknown

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "matches": self.matches, "score": self.score}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InitVerdict:
        verdict = data.get("verdict")
        if verdict not in ("init", "trained", "unknown"):
            return UNKNOWN
        return cls(verdict, data.get("matches"), data.get("score"))


UNKNOWN = InitVerdict("unknown", None, None)


def _rounding(dtype: str | None) -> tuple[float, float]:
    """(relative, absolute) error of one stored value of ``dtype`` (one ulp; conservative when unknown)."""
    if dtype == "float64":
        return 2.0**-52, 1e-300
    if dtype == "float32":
        return 2.0**-23, 1e-44
    if dtype == "float16":
        return 2.0**-10, 6e-8
    if dtype == "float8_e4m3fn":
        return 2.0**-3, 2.0**-9
    if dtype == "float8_e5m2":
        return 2.0**-2, 2.0**-16
    return 2.0**-7, 1e-38  # bfloat16, or not said


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


def _trunc_moments(c: float) -> tuple[float, float]:
    """(std, kurtosis) of the standard normal truncated to [-c, c]."""
    z = 1.0 - 2.0 * _normal_cdf(-c)
    phi = math.exp(-c * c / 2.0) / math.sqrt(2.0 * math.pi)
    m2 = 1.0 - 2.0 * c * phi / z
    m4 = 3.0 * m2 - 2.0 * c**3 * phi / z
    return math.sqrt(m2), m4 / (m2 * m2)


_TRUNC2_STD, _TRUNC2_KURT = _trunc_moments(2.0)
_KURTOSIS = {"normal": 3.0, "uniform": 1.8, "trunc": _TRUNC2_KURT}


@dataclass(frozen=True, slots=True)
class _Law:
    """A centred candidate law: ``normal`` N(0, scale²), ``uniform`` U(±scale), ``trunc`` N(0, scale²)
    truncated to ±2·scale."""

    what: str
    family: Literal["normal", "uniform", "trunc"]
    scale: float
    shown: float | None = None  # the std (normal, trunc) or bound (uniform) the label gives
    std: float = field(init=False)  # of the law; it and the kurtosis are read for every check
    kurtosis: float = field(init=False)

    def __post_init__(self) -> None:
        if self.family == "uniform":
            std = self.scale / math.sqrt(3.0)
        else:
            std = self.scale * (_TRUNC2_STD if self.family == "trunc" else 1.0)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "kurtosis", _KURTOSIS[self.family])

    @property
    def label(self) -> str:  # formatted only for the law that is reported
        if self.shown is None:
            return self.what
        return f"{self.what}, {'bound' if self.family == 'uniform' else 'std'} {_g(self.shown)}"

    def cdf(self, x: float) -> float:
        if self.family == "uniform":
            return min(1.0, max(0.0, (x + self.scale) / (2.0 * self.scale)))
        if self.family == "normal":
            return _normal_cdf(x / self.scale)
        lo = _normal_cdf(-2.0)
        return min(1.0, max(0.0, (_normal_cdf(x / self.scale) - lo) / (1.0 - 2.0 * lo)))


def _z_of_log_p(log_p: float) -> float:
    """The normal |z| whose two-sided p-value is exp(log_p)."""
    if log_p >= 0.0:
        return 0.0
    if log_p > -700.0:
        p = math.exp(log_p)
        if p > 1e-15:
            return min(Z_CAP, _NORMAL.inv_cdf(1.0 - p / 2.0))
    t = -2.0 * (log_p - _LN2)  # tail: q ≈ φ(z)/z  =>  z² ≈ t - ln t - ln 2π
    return min(Z_CAP, math.sqrt(max(t - math.log(t) - math.log(2.0 * math.pi), 0.0)))


def _z_exponential(e_lo: float, e_hi: float) -> float:
    """|z| for an Exp(1) statistic known to lie in [e_lo, e_hi] (two-sided, the nearer end)."""
    if e_lo <= _LN2 <= e_hi:
        return 0.0
    if e_lo > _LN2:  # too large: P(E >= e) = exp(-e)
        return _z_of_log_p(_LN2 - e_lo)
    if e_hi <= 0.0:
        return Z_CAP
    return _z_of_log_p(math.log(2.0 * -math.expm1(-e_hi)))  # too small: P(E <= e) = 1 - exp(-e)


@dataclass(frozen=True, slots=True)
class _Observed:
    n: int
    mean: float
    std: float
    lo: float
    hi: float
    zeros: int
    percentiles: Mapping[str, float] | None
    rel: float  # rounding of one stored value, relative
    tiny: float  # and absolute
    row: int  # exact zeros one zeroed row (padding_idx) accounts for


def _widen(o: _Observed, x: float) -> tuple[float, float]:
    d = abs(x) * o.rel + o.tiny
    return x - d, x + d


def _score(o: _Observed, law: _Law, bound: float, std_z: float) -> float:
    """The largest z of ``o`` against ``law`` (stops early once above ``bound``); ``std_z``: the
    standard deviation's z (as ``init_verdict`` ranks the laws by it), which it is never below."""
    worst = std_z
    if worst >= bound:
        return worst
    allowed = o.row + 2
    if o.zeros > allowed:
        worst = max(worst, min(Z_CAP, (o.zeros - allowed) / math.sqrt(allowed)))
    worst = max(worst, min(Z_CAP, abs(o.mean) * math.sqrt(o.n) / law.std))
    n = o.n
    lo_a, lo_b = _widen(o, o.lo)
    hi_a, hi_b = _widen(o, o.hi)
    worst = max(worst, _z_exponential(n * law.cdf(lo_a), n * law.cdf(lo_b)))
    worst = max(worst, _z_exponential(n * (1.0 - law.cdf(hi_b)), n * (1.0 - law.cdf(hi_a))))
    if o.percentiles is not None and worst < bound:
        slack = 1.0 / n + o.zeros / n + (RANK_SLACK if n > EXACT_PERCENTILES_UP_TO else 0.0)
        joint: list[tuple[float, float]] = []  # (level, its CDF image moved toward it by the slack)
        cdf, rel, tiny, get, isfinite = law.cdf, o.rel, o.tiny, o.percentiles.get, math.isfinite
        for key, q in _LEVELS:
            x = get(key)
            if x is None or not isfinite(x):
                continue
            d = abs(x) * rel + tiny  # _widen, inline (it runs for every level of every candidate)
            u_lo, u_hi = cdf(x - d) - slack, cdf(x + d) + slack
            worst = max(worst, _check_quantile(q, u_lo, u_hi, n))
            if n * min(q, 1.0 - q) >= JOINT_RANK:
                joint.append((q, min(max(q, u_lo), u_hi)))
        worst = max(worst, _check_joint(joint, n))
    return worst


def _check_joint(joint: list[tuple[float, float]], n: int) -> float:
    """z of all the percentiles together: F(x_q) over the levels is a Brownian bridge of variance
    q(1-q)/n, so its Mahalanobis distance is the chi-square of the masses between consecutive
    levels, n·Σ(Δu - Δq)²/Δq on k = len(joint) degrees of freedom (Wilson-Hilferty to a z)."""
    if len(joint) < 2:
        return 0.0
    edges = [(0.0, 0.0), *joint, (1.0, 1.0)]
    chi2 = n * sum(
        ((u1 - u0) - (q1 - q0)) ** 2 / (q1 - q0) for (q0, u0), (q1, u1) in zip(edges, edges[1:], strict=False)
    )
    k = len(joint)
    z = (math.pow(chi2 / k, 1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / math.sqrt(2.0 / (9.0 * k))
    return min(Z_CAP, max(0.0, z))


def _check_quantile(q: float, u_lo: float, u_hi: float, n: int) -> float:
    """|z| of the percentile at level ``q`` whose image under the law's CDF lies in [u_lo, u_hi].
    F(X_(k)) ~ Beta(k, n + 1 - k): normal in the bulk; in the tails (q <= 5% or >= 95%) its tail
    mass times n is Gamma(k), taken through the Wilson-Hilferty cube root (right for k >= 5)."""
    tail = min(q, 1.0 - q)
    if tail > TAIL_LEVEL:
        if n * tail < QUANTILE_TAIL:
            return 0.0
        dev = u_lo - q if q < u_lo else q - u_hi if q > u_hi else 0.0
        return min(Z_CAP, dev / math.sqrt(q * (1.0 - q) / n))
    k = tail * (n - 1) + 1.0
    if k < TAIL_RANK:
        return 0.0
    g_lo, g_hi = (
        (n * max(u_lo, 0.0), n * max(u_hi, 0.0)) if q < 0.5 else (n * max(1.0 - u_hi, 0.0), n * max(1.0 - u_lo, 0.0))
    )
    centre, spread = 1.0 - 1.0 / (9.0 * k), 1.0 / (3.0 * math.sqrt(k))
    z_lo, z_hi = ((math.pow(g / k, 1.0 / 3.0) - centre) / spread for g in (g_lo, g_hi))
    if z_lo <= 0.0 <= z_hi:
        return 0.0
    return min(Z_CAP, min(abs(z_lo), abs(z_hi)))


def _fans(shape: tuple[int, ...], module_type: str | None) -> tuple[int, int]:
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    if module_type == "Conv1D":  # transformers' Conv1D keeps [in, out]
        fan_in, fan_out = fan_out, fan_in
    return fan_in, fan_out


def _g(x: float) -> str:
    return f"{x:.4g}"


FIXED_STDS: tuple[tuple[float, str], ...] = (
    (0.02, "normal_(0, 0.02) / trunc_normal_(std=0.02) (initializer_range)"),
    (0.01, "normal_(0, 0.01)"),
    (0.001, "normal_(0, 0.001)"),
    (1e-6, "normal_(0, 1e-6)"),
    (1.0, "normal_(0, 1) (Embedding default)"),
)


def _integer_family(std: float, base: float, lowest: int, highest: int) -> list[int]:
    """The integers k in [lowest, highest] nearest to the solution of base/sqrt(k) = std."""
    if std <= 0.0:
        return []
    k = (base / std) ** 2
    return sorted({min(highest, max(lowest, int(math.floor(k)))), min(highest, max(lowest, int(math.ceil(k))))})


def _divisors_near(n: int, target: float) -> list[int]:
    """The divisors of ``n`` just below and above ``target``."""
    divs = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divs = sorted({*divs, *(n // d for d in divs)})
    below = [d for d in divs if d <= target]
    above = [d for d in divs if d >= target]
    return sorted({*(below[-1:]), *(above[:1])})


RESIDUAL_PROJECTIONS = ("c_proj", "o_proj", "out_proj", "down_proj", "dense_4h_to_h", "fc2", "wo")
"""Modules whose weights some model code scales by 1/sqrt(2·n_layer) (GPT-2, nanoGPT, Megatron)."""


def _law(what: str, family: Literal["normal", "uniform", "trunc"], value: float) -> _Law:
    """A candidate named after the initialiser, its scale given as the resulting std (normal,
    trunc) or bound (uniform)."""
    if family == "uniform":
        return _Law(what, family, value, value)
    return _Law(what, family, value / (_TRUNC2_STD if family == "trunc" else 1.0), value)


_FIXED_LAWS: tuple[_Law, ...] = (
    *(_Law(label, "normal", s) for s, label in FIXED_STDS),
    _Law("trunc_normal_(std=0.02, a=-0.04, b=0.04)", "trunc", 0.02),
)
"""Every tensor's first candidates (laws are immutable, so one set serves all)."""


def _candidates(name: str, shape: tuple[int, ...], o: _Observed, module_type: str | None) -> list[_Law]:
    parts = name.split(".")
    owner = parts[-2] if len(parts) >= 2 else ""
    laws = list(_FIXED_LAWS)
    if owner in RESIDUAL_PROJECTIONS:
        for layers in _integer_family(o.std, 0.02 / math.sqrt(2.0), 1, 1024):
            what = f"normal_(0, 0.02/sqrt(2·{layers})) (GPT-2 residual, n_layer={layers})"
            laws.append(_law(what, "normal", 0.02 / math.sqrt(2 * layers)))
    if parts[-1] == "weight" and owner == "relative_attention_bias":  # T5: normal_(0, d_model^-0.5)
        for d_model in _integer_family(o.std, 1.0, 1, 1 << 16):
            laws.append(
                _law(
                    f"normal_(0, d_model^-0.5) (T5 relative_attention_bias, d_model={d_model})", "normal", d_model**-0.5
                )
            )
    if len(shape) == 1:
        bound = max(abs(o.lo), abs(o.hi)) * (o.n + 1) / o.n
        if bound > 0.0:
            laws.append(_law("uniform_(±1/sqrt(fan_in)) (torch default bias, bound fitted)", "uniform", bound))
        return laws
    laws += _shape_laws(shape, module_type)
    if (
        len(shape) == 2 and owner == "q" and o.std > 0.0
    ):  # T5: normal_(0, (d_model·d_kv)^-0.5), d_kv dividing the inner dim
        fan_in, fan_out = _fans(shape, module_type)
        if fan_in > 0 and fan_out > 0:
            for d_kv in _divisors_near(shape[0], 1.0 / (o.std**2 * fan_in)):
                what = f"normal_(0, (d_model·d_kv)^-0.5) (T5 q, d_kv={d_kv})"
                laws.append(_law(what, "normal", 1 / math.sqrt(fan_in * d_kv)))
    return laws


@lru_cache(maxsize=4096)
def _shape_laws(shape: tuple[int, ...], module_type: str | None) -> tuple[_Law, ...]:
    """The candidates a tensor of this shape (2-D or more) gets from its fans alone: the same for
    every tensor of the shape, so made once per shape."""
    fan_in, fan_out = _fans(shape, module_type)
    if fan_in <= 0 or fan_out <= 0:
        return ()
    both = fan_in + fan_out
    laws = [
        _law("kaiming_uniform_(a=sqrt(5)) (torch default)", "uniform", 1 / math.sqrt(fan_in)),
        _law("kaiming_uniform_(relu, fan_in)", "uniform", math.sqrt(6 / fan_in)),
        _law("kaiming_uniform_(relu, fan_out)", "uniform", math.sqrt(6 / fan_out)),
        _law("kaiming_uniform_(linear, fan_in)", "uniform", math.sqrt(3 / fan_in)),
        _law("kaiming_uniform_(linear, fan_out)", "uniform", math.sqrt(3 / fan_out)),
        _law("xavier_uniform_", "uniform", math.sqrt(6 / both)),
        _law("uniform_(±1/sqrt(fan_out))", "uniform", 1 / math.sqrt(fan_out)),
        _law("kaiming_normal_(relu, fan_in)", "normal", math.sqrt(2 / fan_in)),
        _law("kaiming_normal_(relu, fan_out)", "normal", math.sqrt(2 / fan_out)),
        _law("kaiming_normal_(linear, fan_in) / normal_(0, fan_in^-0.5)", "normal", 1 / math.sqrt(fan_in)),
        _law("xavier_normal_", "normal", math.sqrt(2 / both)),
    ]
    rows = shape[0]
    if len(shape) == 2:
        for gates, what in ((3, "GRU"), (4, "LSTM")):
            if rows % gates == 0:
                laws.append(_law(f"{what} default uniform_(±1/sqrt(hidden))", "uniform", 1 / math.sqrt(rows // gates)))
    return tuple(laws)


def _first(pair: tuple[float, _Law]) -> float:
    return pair[0]


def _constant(value: float) -> str:
    if value == 0.0:
        return "zeros"
    if value == 1.0:
        return "ones"
    return f"constant {_g(value)}"


def init_verdict(
    name: str,
    shape: tuple[int, ...],
    stats: TensorStats | None,
    *,
    kind: str = "parameter",
    module_type: str | None = None,
    dtype: str | None = None,
) -> InitVerdict:
    """The verdict for one tensor (see the module docstring). ``module_type`` is the class of the
    module holding it where known (only ``"Conv1D"`` changes the fan convention); ``dtype`` (the
    stored one) sets the rounding allowance and makes integer and bool tensors "unknown"."""
    if stats is None or kind != "parameter" or not shape or stats.numel < 2 or stats.note is not None:
        return UNKNOWN
    if dtype is not None and not dtype.startswith(("float", "bfloat")):
        return UNKNOWN
    if stats.nan or stats.inf or None in (stats.mean, stats.std, stats.min, stats.max):
        return UNKNOWN
    assert stats.mean is not None and stats.std is not None and stats.min is not None and stats.max is not None
    if stats.min == stats.max:
        return InitVerdict("init", _constant(stats.min), 0.0)
    if stats.numel < MIN_NUMEL or stats.std <= 0.0:
        return UNKNOWN
    rel, tiny = _rounding(dtype)
    observed = _Observed(
        n=stats.numel,
        mean=stats.mean,
        std=stats.std,
        lo=stats.min,
        hi=stats.max,
        zeros=stats.zeros,
        percentiles=stats.percentiles,
        rel=rel,
        tiny=tiny,
        row=math.prod(shape[1:]) if len(shape) >= 2 else 0,
    )
    best: tuple[float, str] = (math.inf, "")
    laws = _candidates(name, shape, observed, module_type)
    # each law's z of the standard deviation (inline: it runs for every candidate of every tensor)
    slack, n4, std = observed.rel + observed.zeros / observed.n, 4.0 * observed.n, observed.std
    sqrt = math.sqrt
    ranked = sorted(
        (
            (min(Z_CAP, max(0.0, abs(std / law.std - 1.0) - slack) / sqrt((law.kurtosis - 1.0) / n4)), law)
            for law in laws
        ),
        key=_first,
    )
    for std_z, law in ranked:  # closest standard deviation first: the first that fits is the match
        if std_z >= best[0]:  # a score is never below its std's z: no law from here on can do better
            break
        score = _score(observed, law, best[0], std_z)
        if score < best[0]:
            best = (score, law.label)
        if best[0] <= INIT_SCORE:
            break
    score, label = best
    return InitVerdict("init" if score <= INIT_SCORE else "trained", label, round(score, 3))


def verdict_for(t: TensorInfo, stats: TensorStats | None, module_types: Mapping[str, str] | None = None) -> InitVerdict:
    """``init_verdict`` of a listed tensor: its module's class from ``module_types`` (module path ->
    class, in the same naming as ``t.name``), decoded or dequantized values judged as their format."""
    module = t.name.rpartition(".")[0]
    dtype = t.dtype if t.plain else t.shown_dtype
    return init_verdict(t.name, t.shape, stats, kind=t.kind, module_type=(module_types or {}).get(module), dtype=dtype)


def is_weight(name: str) -> bool:
    """A layer's weight (``…weight``, ``…in_proj_weight``, ``weight_ih_l0``), as rolled up per module."""
    return name.rpartition(".")[2].startswith("weight") or name.endswith("weight")


def untrained_summary(verdicts: Mapping[str, InitVerdict]) -> tuple[int, int]:
    """(weight tensors that look untrained, weight tensors with a verdict) among ``verdicts``
    (tensor name -> verdict); "unknown" verdicts count in neither."""
    judged = [v for name, v in verdicts.items() if is_weight(name) and v.verdict != "unknown"]
    return sum(v.verdict == "init" for v in judged), len(judged)


def untrained_by_module(verdicts: Mapping[str, InitVerdict]) -> dict[str, tuple[int, int]]:
    """Per module path (``""`` the root, ``"a"``, ``"a.b"`` …): (weight tensors with a verdict,
    those that look untrained), for the tree's "3 of 24 layers look untrained"."""
    out: dict[str, tuple[int, int]] = {}
    for name, v in verdicts.items():
        if not is_weight(name) or v.verdict == "unknown":
            continue
        parts = name.split(".")
        for i in range(len(parts)):
            path = ".".join(parts[:i])
            layers, untrained = out.get(path, (0, 0))
            out[path] = (layers + 1, untrained + (v.verdict == "init"))
    return out
