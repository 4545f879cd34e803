"""The per-tensor statistics record (plain data, JSON without NaN/Inf literals).

Each scalar statistic is declared once, here, as a field of ``TensorStats`` made with ``value()``
or ``count()``: the catalogue's columns, the stored and JSON forms and the API schema are derived
from these declarations (``STATISTICS``), so a new statistic is one edit (plus its migration).
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any

HIST_BINS = 64
PERCENTILES: tuple[str, ...] = ("0.1", "1", "5", "25", "50", "75", "95", "99", "99.9")
"""The percentiles every tensor gets (of its finite values), as the keys of ``stats.percentiles``."""


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def value(doc: str) -> Any:
    """A float statistic of the finite values; None where it is not defined."""
    return field(default=None, metadata={"statistic": "float", "doc": doc})


def count(doc: str) -> Any:
    """A count of elements."""
    return field(default=0, metadata={"statistic": "int", "doc": doc})


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor. The float statistics and the histogram cover the finite values
    only; ``nan`` and ``inf`` count the others. None means "not defined"."""

    numel: int
    mean: float | None = value("mean of the finite values; null when undefined")
    std: float | None = value("Bessel-corrected, like torch.std; null for fewer than 2 finite values")
    min: float | None = value("smallest finite value")
    max: float | None = value("largest finite value")
    l2: float | None = value("L2 norm of the finite values")
    absmax: float | None = value("largest absolute finite value")
    zeros: int = count("elements equal to zero")
    nan: int = count("NaN elements")
    inf: int = count("+Inf and -Inf elements")
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    hist_min: float | None = None
    hist_max: float | None = None
    note: str | None = None  # why some stats are absent (e.g. complex dtype)
    percentiles: dict[str, float] | None = None  # PERCENTILES -> value (float64); None: no finite values
    log_hist: LogHistogram | None = None  # signed histogram by binary magnitude; None: no finite values
    digest: str | None = None  # "xxh3-128:<hex>" of dtype, shape and the logical bytes in C order
    # The init verdict judged from these stats by the stats job and stored with them (JSON-ready
    # {verdict, matches, score}, ckptscope.insights.init_verdict); None where not judged yet (the
    # CLI judges on the fly). Not part of the statistics' JSON: the API shows it as the tensor's
    # ``init``.
    init: dict[str, Any] | None = None

    def to_json(self, with_log_hist: bool = True) -> dict[str, Any]:
        """``with_log_hist`` False: ``log_hist`` null (a page of rows leaves it to each tensor's own view)."""
        out: dict[str, Any] = {"numel": self.numel}
        for s in STATISTICS:
            v = getattr(self, s.name)
            out[s.name] = finite_or_none(v) if s.is_float else v
        out["hist"] = list(self.hist)
        out["hist_min"] = finite_or_none(self.hist_min)
        out["hist_max"] = finite_or_none(self.hist_max)
        out["note"] = self.note
        out["percentiles"] = None if self.percentiles is None else dict(self.percentiles)
        out["log_hist"] = None if self.log_hist is None or not with_log_hist else self.log_hist.to_json()
        out["digest"] = self.digest
        return out


@dataclass(slots=True)
class LogHistogram:
    """Counts of the finite values by sign and binary magnitude: ``pos[e]`` counts the positive
    values with 2**e <= x < 2**(e+1), ``neg[e]`` the negative ones with 2**e <= -x < 2**(e+1);
    subnormal values count at the smallest normal exponent minus one; ``zero`` counts the zeros."""

    neg: dict[int, int]
    zero: int
    pos: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "neg": list(map(list, sorted(self.neg.items()))),  # [[exponent, count], ...] ascending
            "zero": self.zero,
            "pos": list(map(list, sorted(self.pos.items()))),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogHistogram:
        return cls(
            {int(e): int(c) for e, c in data["neg"]}, int(data["zero"]), {int(e): int(c) for e, c in data["pos"]}
        )


@dataclass(frozen=True, slots=True)
class Statistic:
    name: str
    is_float: bool  # float (None when undefined) or an integer count
    doc: str


def _declared(f: Field[Any]) -> Statistic | None:
    kind = f.metadata.get("statistic")
    return None if kind is None else Statistic(f.name, kind == "float", f.metadata["doc"])


STATISTICS: tuple[Statistic, ...] = tuple(s for f in fields(TensorStats) if (s := _declared(f)) is not None)
