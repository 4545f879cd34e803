"""The per-tensor statistics record (plain data, JSON without NaN/Inf literals)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

HIST_BINS = 64


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(slots=True)
class TensorStats:
    """Statistics of one tensor. mean/std/min/max/l2/absmax and the histogram cover the finite
    values only; ``nan`` and ``inf`` count the others. ``std`` is Bessel-corrected like
    ``torch.std`` (None for fewer than two finite values). None means "not defined"."""

    numel: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    l2: float | None = None
    absmax: float | None = None
    zeros: int = 0
    nan: int = 0
    inf: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    hist_min: float | None = None
    hist_max: float | None = None
    note: str | None = None  # why some stats are absent (e.g. complex dtype)

    def to_json(self) -> dict[str, Any]:
        f = finite_or_none
        return {
            "numel": self.numel,
            "mean": f(self.mean),
            "std": f(self.std),
            "min": f(self.min),
            "max": f(self.max),
            "l2": f(self.l2),
            "absmax": f(self.absmax),
            "zeros": self.zeros,
            "nan": self.nan,
            "inf": self.inf,
            "hist": list(self.hist),
            "hist_min": f(self.hist_min),
            "hist_max": f(self.hist_max),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorStats:
        return cls(**{k: data.get(k) for k in cls.__slots__ if k in data})  # type: ignore[attr-defined]
