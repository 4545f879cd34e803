"""Types of the optional C kernel (``_kernel.c``); ``kernel_engine.load_kernel`` imports it."""

from typing_extensions import Buffer

SOURCE_SHA256: str

def pass1(values: Buffer, count: int, is_double: bool, /) -> tuple[int, float, float, float, int, int, int]:
    """Finite count, sum, min, max, non-zero, NaN and Inf counts of the ``count`` float32 (or
    float64) values that ``values`` holds exactly (ValueError otherwise)."""

def pass2(
    values: Buffer,
    count: int,
    is_double: bool,
    dirty: bool,
    mean: float,
    lo: float,
    scale: float,
    hist: Buffer,
    /,
) -> tuple[float, float]:
    """Sums of (x - mean) and (x - mean)^2 of the finite values; adds their 64-bin histogram into
    ``hist``, a writable buffer of exactly 64 int64 counts. Values outside [lo, hi] fall in the
    first or last bin."""
