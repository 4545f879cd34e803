"""Diagnostics: rules over the per-tensor statistics that say what looks wrong, and where.

Each rule gives ``Finding`` records naming the rule, a severity, the target (a tensor name or a
module path), the offending values and the threshold they crossed. The rules (README "Findings"):

- ``nan-inf`` (error): any NaN or Inf element.
- ``spike`` (warning): ``absmax / max(|p0.1|, |p99.9|)`` above ``spike_ratio`` (needs percentiles).
- ``variance-exploding`` / ``variance-collapsed`` (warning): the std against the median std of the
  tensor's siblings (same role and shape: ``layers.3.mlp.up_proj.weight`` and the other layers'
  ``up_proj.weight``) above ``variance_exploding`` / below ``variance_collapsed`` times it.
- ``dead`` (warning; info for 0/1-D tensors): every element is zero.
- ``near-zero`` (warning): the fraction of zeros above ``near_zero_fraction``.
- ``norm-outlier`` (warning): the L2 norm far from the siblings' median, in robust units (median
  absolute deviation of the log norms, at least ``norm_min_spread``), beyond ``norm_z`` of them;
  not reported where a variance rule already fired on the tensor.
- ``untrained-among-trained`` (warning): an init verdict of "init" while more than
  ``untrained_majority`` of the siblings' are "trained"; at module level, a whole layer
  (``layers.N``) whose tensors all look untrained while most of its sibling layers look trained.

Value rules apply to parameters (not buffers); ``nan-inf`` to every tensor. Sibling rules need at
least ``min_siblings`` tensors in the group; the variance and norm rules look at tensors of at least
``sibling_min_ndim`` dimensions, ``untrained-among-trained`` at any tensor but scalars.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    from ckptscope.insights.init_verdict import InitVerdict

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
_MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    severity: str  # one of SEVERITIES
    target: str  # tensor name, or module path ("" for the root)
    level: Literal["tensor", "module"]
    message: str
    values: dict[str, Any]  # the offending values (JSON-ready: finite floats, ints, strings)
    threshold: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "target": self.target,
            "level": self.level,
            "message": self.message,
            "values": dict(self.values),
            "threshold": self.threshold,
        }


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Every threshold of the rules, with its documented default (README "Findings")."""

    spike_ratio: float = 20.0  # absmax / max(|p0.1|, |p99.9|) above this: spike
    variance_exploding: float = 10.0  # std / siblings' median std above this: exploding
    variance_collapsed: float = 0.1  # std / siblings' median std below this: collapsed
    near_zero_fraction: float = 0.95  # zeros / numel above this (and not all zero): near-zero
    norm_z: float = 5.0  # |log(l2 / median)| / robust spread above this: norm outlier
    norm_min_spread: float = 0.1  # floor of the robust spread of log norms (0.1 ~ 10 %)
    untrained_majority: float = 0.5  # "init" while more than this fraction of siblings are "trained"
    min_siblings: int = 3  # a sibling group needs at least this many tensors (or layers)
    sibling_min_ndim: int = 2  # sibling rules look at tensors of at least this many dimensions

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Thresholds:
        """Defaults overridden by ``data`` (e.g. a JSON file's object). Raises ValueError naming an
        unknown key or a value that is not a positive number (an integer for the integer ones)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in data.items():
            if key not in known:
                raise ValueError(f"unknown findings threshold {key!r} (known: {', '.join(sorted(known))})")
            is_int = known[key].type in ("int", int)
            if isinstance(raw, bool) or not isinstance(raw, int | float) or (is_int and not isinstance(raw, int)):
                raise ValueError(f"findings threshold {key!r} must be {'an integer' if is_int else 'a number'}")
            if not math.isfinite(raw) or raw <= 0:
                raise ValueError(f"findings threshold {key!r} must be positive and finite")
            values[key] = int(raw) if is_int else float(raw)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RuleStats(Protocol):
    """What the rules read of a tensor's stats: a ``TensorStats``, or just these figures of it."""

    @property
    def numel(self) -> int: ...
    @property
    def std(self) -> float | None: ...
    @property
    def l2(self) -> float | None: ...
    @property
    def absmax(self) -> float | None: ...
    @property
    def zeros(self) -> int: ...
    @property
    def nan(self) -> int: ...
    @property
    def inf(self) -> int: ...
    @property
    def percentiles(self) -> dict[str, float] | None: ...


class TensorFacts(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "parameter" | "buffer"
    stats: RuleStats | None
    init: InitVerdict | None


_NUMERIC = re.compile(r"(?<![^.])\d+(?![^.])")


def role(name: str) -> str:
    """The name with its numeric path components as ``N``: ``model.layers.3.mlp.up_proj.weight``
    -> ``model.layers.N.mlp.up_proj.weight``."""
    return _NUMERIC.sub("N", name)


def _num(x: float) -> float | None:
    """A float for the JSON values: rounded to 6 significant digits; None where it overflowed."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _finding(rule: str, severity: str, f: TensorFacts, message: str, values: dict[str, Any], threshold: Any) -> Finding:
    return Finding(rule, severity, f.name, "tensor", message, values, threshold)


# --- rules on one tensor ---------------------------------------------------------------------


def _nan_inf(f: TensorFacts, s: RuleStats) -> Finding | None:
    if not (s.nan or s.inf):
        return None
    return _finding(
        "nan-inf",
        "error",
        f,
        f"{s.nan} NaN and {s.inf} Inf of {s.numel} elements",
        {"nan": s.nan, "inf": s.inf, "numel": s.numel},
        0,
    )


def _spike(f: TensorFacts, s: RuleStats, t: Thresholds) -> Finding | None:
    p = s.percentiles
    if not p or s.absmax is None or "0.1" not in p or "99.9" not in p:
        return None  # no percentiles (older stats): the rule cannot tell
    bulk = max(abs(p["0.1"]), abs(p["99.9"]))
    if not bulk > 0 or not math.isfinite(bulk):
        return None  # the bulk is zero: near-zero / dead say so
    ratio = s.absmax / bulk
    if not ratio > t.spike_ratio:
        return None
    return _finding(
        "spike",
        "warning",
        f,
        f"|max| {s.absmax:.4g} is {ratio:.3g}x the 0.1-99.9 percentile range's edge {bulk:.4g}",
        {"absmax": _num(s.absmax), "p0.1": _num(p["0.1"]), "p99.9": _num(p["99.9"]), "ratio": _num(ratio)},
        t.spike_ratio,
    )


def _zeros(f: TensorFacts, s: RuleStats, t: Thresholds) -> Finding | None:
    if s.numel <= 0 or s.nan or s.inf:
        return None
    if s.zeros == s.numel:
        severity = "warning" if len(f.shape) >= 2 else "info"
        return _finding(
            "dead", severity, f, f"all {s.numel} elements are zero", {"zeros": s.zeros, "numel": s.numel}, 1.0
        )
    fraction = s.zeros / s.numel
    if fraction > t.near_zero_fraction:
        return _finding(
            "near-zero",
            "warning",
            f,
            f"{fraction:.2%} of the elements are zero",
            {"zeros": s.zeros, "numel": s.numel, "zero_fraction": _num(fraction)},
            t.near_zero_fraction,
        )
    return None


def _is_dead(s: RuleStats) -> bool:
    return s.numel > 0 and s.zeros == s.numel


# --- rules against siblings --------------------------------------------------------------------


_GROUP = "tensors of its role and shape"


def _roles(facts: Sequence[TensorFacts]) -> list[tuple[TensorFacts, str]]:
    """The parameters that have a role other than their own name (a numbered path part), with it."""
    out = []
    for f in facts:
        if f.kind == "parameter":
            r = role(f.name)
            if r != f.name:
                out.append((f, r))
    return out


def _groups(roles: Sequence[tuple[TensorFacts, str]], t: Thresholds, min_ndim: int) -> list[list[TensorFacts]]:
    """Parameters of the same role and shape (at least ``min_ndim`` dimensions), in groups of at
    least ``min_siblings``; ``roles``: ``_roles`` of the facts."""
    by: dict[tuple[str, tuple[int, ...]], list[TensorFacts]] = defaultdict(list)
    for f, r in roles:
        if len(f.shape) >= min_ndim:
            by[(r, f.shape)].append(f)
    return [g for g in by.values() if len(g) >= t.min_siblings]


def _variance(group: list[TensorFacts], t: Thresholds) -> list[Finding]:
    live = [
        (f, f.stats.std) for f in group if f.stats is not None and f.stats.std is not None and not _is_dead(f.stats)
    ]
    if len(live) < t.min_siblings:
        return []
    median = statistics.median(std for _, std in live)
    if not median > 0:
        return []
    out = []
    for f, std in live:
        ratio = std / median
        if t.variance_collapsed <= ratio <= t.variance_exploding:
            continue
        values = {"std": _num(std), "median_std": _num(median), "ratio": _num(ratio), "group": len(live)}
        if ratio > t.variance_exploding:
            out.append(
                _finding(
                    "variance-exploding",
                    "warning",
                    f,
                    f"std {std:.4g} is {ratio:.3g}x the median {median:.4g} of {len(live)} {_GROUP}",
                    values,
                    t.variance_exploding,
                )
            )
        elif ratio < t.variance_collapsed:
            out.append(
                _finding(
                    "variance-collapsed",
                    "warning",
                    f,
                    f"std {std:.4g} is {ratio:.3g}x the median {median:.4g} of {len(live)} {_GROUP}",
                    values,
                    t.variance_collapsed,
                )
            )
    return out


def _norms(group: list[TensorFacts], t: Thresholds, skip: set[str]) -> list[Finding]:
    live = [(f, f.stats.l2) for f in group if f.stats is not None and f.stats.l2 is not None and f.stats.l2 > 0]
    if len(live) < t.min_siblings:
        return []
    logs = [math.log(l2) for _, l2 in live]
    centre = statistics.median(logs)
    spread = max(_MAD_SCALE * statistics.median(abs(x - centre) for x in logs), t.norm_min_spread)
    median = math.exp(centre)
    out = []
    for (f, l2), x in zip(live, logs, strict=True):
        z = (x - centre) / spread
        if abs(z) > t.norm_z and f.name not in skip:
            out.append(
                _finding(
                    "norm-outlier",
                    "warning",
                    f,
                    f"L2 norm {l2:.4g} is {l2 / median:.3g}x the median {median:.4g} of {len(live)} {_GROUP} "
                    f"({z:+.3g} robust deviations)",
                    {"l2": _num(l2), "median_l2": _num(median), "z": _num(z), "group": len(live)},
                    t.norm_z,
                )
            )
    return out


def _untrained(group: list[TensorFacts], t: Thresholds) -> list[Finding]:
    verdicts = [f for f in group if f.init is not None and f.init.verdict != "unknown"]
    trained = sum(1 for f in verdicts if f.init is not None and f.init.verdict == "trained")
    others = len(verdicts) - 1  # an "init" tensor's siblings with a verdict; all trained ones are among them
    out: list[Finding] = []
    if len(verdicts) < t.min_siblings or not trained > t.untrained_majority * others:
        return out
    for f in verdicts:
        assert f.init is not None
        if f.init.verdict == "init":
            out.append(
                _finding(
                    "untrained-among-trained",
                    "warning",
                    f,
                    f"looks like its initialisation ({f.init.matches or 'an initialiser'}) while {trained} of "
                    f"{others} siblings look trained",
                    {
                        "matches": f.init.matches,
                        "score": None if f.init.score is None else _num(f.init.score),
                        "trained_siblings": trained,
                        "siblings": others,
                    },
                    t.untrained_majority,
                )
            )
    return out


# --- module rules ------------------------------------------------------------------------------


def _layers(facts: Sequence[TensorFacts]) -> dict[str, dict[str, list[TensorFacts]]]:
    """Layer modules (paths ending in a number, e.g. ``model.layers.3``) by their container path,
    each with the parameters under it that have an init verdict."""
    out: dict[str, dict[str, list[TensorFacts]]] = defaultdict(lambda: defaultdict(list))
    for f in facts:
        if f.kind != "parameter" or f.init is None or f.init.verdict == "unknown":
            continue
        parts = f.name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                out[".".join(parts[:i])][".".join(parts[: i + 1])].append(f)
                break  # the outermost numbered module only: layers.N, not layers.N.experts.M
    return out


def _mostly_trained(members: list[TensorFacts]) -> bool:
    return sum(1 for m in members if m.init is not None and m.init.verdict == "trained") * 2 > len(members)


def _untrained_layers(facts: Sequence[TensorFacts], t: Thresholds) -> list[Finding]:
    out = []
    for _container, layers in sorted(_layers(facts).items()):
        if len(layers) < t.min_siblings:
            continue
        untrained = {
            p for p, members in layers.items() if all(m.init is not None and m.init.verdict == "init" for m in members)
        }
        trained = {p for p, members in layers.items() if p not in untrained and _mostly_trained(members)}
        others = len(layers) - 1
        for path in sorted(untrained, key=lambda p: int(p.rsplit(".", 1)[-1])):
            if len(trained) > t.untrained_majority * others:
                out.append(
                    Finding(
                        "untrained-among-trained",
                        "warning",
                        path,
                        "module",
                        f"all {len(layers[path])} tensors look like their initialisation while {len(trained)} of "
                        f"{others} sibling layers look trained",
                        {"tensors": len(layers[path]), "trained_siblings": len(trained), "siblings": others},
                        t.untrained_majority,
                    )
                )
    return out


def find(facts: Sequence[TensorFacts], thresholds: Thresholds = Thresholds()) -> list[Finding]:
    """Every finding of the rules over these tensors (names relative to one root), tensor findings
    in the order of ``facts`` then module findings, each tensor's by rule."""
    t = thresholds
    per: dict[str, list[Finding]] = defaultdict(list)
    for f in facts:
        s = f.stats
        if s is None:
            continue
        found = _nan_inf(f, s)
        if found:
            per[f.name].append(found)
        if f.kind != "parameter":
            continue
        for rule in (_spike(f, s, t), _zeros(f, s, t)):
            if rule:
                per[f.name].append(rule)
    roles = _roles(facts)
    for group in _groups(roles, t, t.sibling_min_ndim):
        variance = _variance(group, t)
        for found in variance:
            per[found.target].append(found)
        for found in _norms(group, t, {v.target for v in variance}):
            per[found.target].append(found)
    for group in _groups(roles, t, 1):  # a norm layer's weight still at ones among trained ones counts too
        for found in _untrained(group, t):
            per[found.target].append(found)
    out = [found for f in facts for found in per.pop(f.name, [])]
    return out + _untrained_layers(facts, t)


def load_thresholds(path: str | os.PathLike[str]) -> Thresholds:
    """Thresholds from a JSON file holding an object of overrides (``Thresholds.from_mapping``).
    Raises ValueError saying what is wrong with the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON object of thresholds")
    return Thresholds.from_mapping(data)
