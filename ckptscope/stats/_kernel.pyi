"""Types of the optional C kernel (``_kernel.c``); ``kernel_engine.load_kernel`` imports it."""

from typing_extensions import Buffer

SOURCE_SHA256: str

def pass1(
    values: Buffer, count: int, is_double: bool, keys: Buffer, /
) -> tuple[int, float, float, float, int, int, int]:
    """Finite count, sum, min, max, non-zero, NaN and Inf counts of the ``count`` float32 (or
    float64) values that ``values`` holds exactly (ValueError otherwise). Adds one to ``keys``
    (a writable, int64-aligned buffer of exactly 65536 int64 counts) at the top 16 bits of each
    value's order-preserving key, NaN and Inf included."""

def pass2(
    values: Buffer,
    count: int,
    is_double: bool,
    dirty: bool,
    mean: float,
    lo: float,
    scale: float,
    hist: Buffer,
    lut: Buffer,
    out: Buffer,
    collected: int,
    sub: Buffer,
    /,
) -> tuple[float, float, int]:
    """Sums of (x - mean) and (x - mean)^2 of the finite values (all values unless ``dirty``) and
    the number of values in ``out`` afterwards. Adds their 64-bin histogram into ``hist``, a
    writable buffer of exactly 64 int64 counts; values outside [lo, hi] fall in the first or last
    bin.

    ``lut``: empty (no percentiles: ``out``, ``sub`` untouched, ``collected`` returned as passed)
    or exactly 65536 bytes, at most 18 of them non-zero (``MAX_WANTED`` in _kernel.c; all zero:
    nothing wanted): ``lut[top16(key)] = t`` wants the values of that key bin as wanted bin ``t``.
    With a non-empty ``out`` (writable, a whole number of values of the chunk's width,
    ``collected`` of them already there, ``-1 <= collected <= capacity``) their values are copied
    after those, in order (NaN and Inf skipped when ``dirty``); the result is -1 when they do not
    fit (or ``collected`` was -1), and nothing is written past the end. With an empty ``out`` they
    are counted into ``sub`` (writable, aligned, exactly ``max(lut) * 65536`` int64 counts) at
    ``(t - 1) * 65536 +`` the next 16 bits of their key. Any other buffer raises ValueError
    (TypeError for a read-only or non-buffer argument)."""
