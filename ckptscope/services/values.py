"""A tensor's values, read from its file, for the detail panel: the values of a tiny tensor, and
the counts of the distinct values of a boolean or integer tensor that has few of them.

Every kind of tensor is read the one way the writers read it (``formats.writers.iter_tensor_bytes``):
plain views, GGUF-encoded blocks (decoded), torch quantized tensors (dequantized) and stitched
torch.distributed.checkpoint tensors alike. Reads are bounded: at most ``MAX_SHOWN`` values are
shown, and distinct values are only counted in tensors of at most ``MAX_COUNTED`` elements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ckptscope.errors import CkptscopeError
from ckptscope.formats import TensorInfo
from ckptscope.formats.model import DTYPES
from ckptscope.formats.writers import OutputTensor, iter_tensor_bytes
from ckptscope.stats import TensorStats

log = logging.getLogger(__name__)

MAX_SHOWN = 64  # a tensor of at most this many values shows them all
MAX_COUNTED = 1 << 20  # distinct values are counted in tensors of at most this many elements
MAX_DISTINCT = 16  # ... and shown as one bar each when there are at most this many
NUMPY_NATIVE = frozenset({"float16", "float32", "float64"})  # floats numpy reads as they are stored


@dataclass(frozen=True, slots=True)
class TensorValues:
    category: str  # "float" | "int" | "uint" | "bool" | "complex": how the values read
    values: list[float | int | bool] | None = None  # all of them, row-major (tiny tensors only)
    distinct: list[tuple[float | int | bool, int]] | None = None  # (value, count), ascending


def value_category(info: TensorInfo) -> str:
    """What the tensor's values are: a quantized or encoded tensor's values are floats."""
    if info.quant is not None or info.encoding is not None:
        return "float"
    return DTYPES[info.dtype].category


def read_values(info: TensorInfo) -> np.ndarray:
    """All the tensor's values, row-major, flat: float64 for floating tensors (bf16, fp8 and
    quantized ones included), the stored integer or bool type otherwise. Callers bound ``numel``."""
    category = value_category(info)
    if category == "complex":
        raise ValueError("complex values are not read")
    native = category != "float" or (info.plain and info.dtype in NUMPY_NATIVE)  # integers stay integers
    out = OutputTensor(info.name, info, dtype=None if native else "float64")
    data = b"".join(iter_tensor_bytes(out))
    return np.frombuffer(data, dtype=np.dtype(out.out_dtype)).copy()


def _python(values: np.ndarray) -> list[float | int | bool]:
    return list(values.tolist())


def _few_distinct_possible(stats: TensorStats | None) -> bool:
    """More than MAX_DISTINCT non-empty bins means more than MAX_DISTINCT distinct values."""
    return stats is None or sum(1 for c in stats.hist if c) <= MAX_DISTINCT


def _shown_and_counted(info: TensorInfo, stats: TensorStats | None) -> tuple[bool, bool]:
    """Whether the panel lists the tensor's values (a tiny tensor) and whether it counts its
    distinct values (an integer or bool tensor that can have few)."""
    category = value_category(info)
    numel = info.numel
    tiny = category != "complex" and 0 < numel <= MAX_SHOWN
    count = category in ("int", "uint", "bool") and 0 < numel <= MAX_COUNTED and _few_distinct_possible(stats)
    return tiny, count


def reads_values(info: TensorInfo, stats: TensorStats | None = None) -> bool:
    """Whether ``tensor_values`` reads the tensor's values, or answers from the listing alone."""
    return any(_shown_and_counted(info, stats))


def tensor_values(info: TensorInfo, stats: TensorStats | None = None) -> TensorValues:
    """What the detail panel shows of a tensor's values (nothing for most tensors). A file that
    cannot be read here leaves the panel with the statistics alone."""
    category = value_category(info)
    tiny, count = _shown_and_counted(info, stats)
    if not (tiny or count):
        return TensorValues(category)
    try:
        values = read_values(info)
    except (CkptscopeError, OSError, ValueError, RuntimeError, TypeError) as exc:
        log.warning("could not read the values of %r: %s", info.name, exc)
        return TensorValues(category)
    distinct = None
    if count:
        uniq, counts = np.unique(values, return_counts=True)
        if len(uniq) <= MAX_DISTINCT:
            distinct = list(zip(_python(uniq), [int(c) for c in counts], strict=True))
    return TensorValues(category, values=_python(values) if tiny else None, distinct=distinct)
