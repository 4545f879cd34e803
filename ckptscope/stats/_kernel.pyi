"""Types of the optional C kernel (``_kernel.c``); ``kernel_engine.load_kernel`` imports it.

Every call takes a ``dtype`` code from ``DTYPES`` and reads the values as stored (any alignment),
converting them inline to the compute width: float64 for float64 and every integer and bool
dtype, float32 for float32, float16, bfloat16 and both float8 kinds. The conversion is torch's
``x.to(torch.float32 / torch.float64)`` bit for bit (NaN keeps its sign; a bool byte other than
0 reads as 1). Codes 0 and 1 are float32 and float64, so a bool "is double" still works.
"""

from typing_extensions import Buffer

SOURCE_SHA256: str

DTYPES: dict[str, int]
"""The dtype codes by torch's name: float32 0, float64 1, float16, bfloat16, float8_e4m3fn,
float8_e5m2, int8, uint8, int16, uint16, int32, uint32, int64, uint64, bool."""

def convert(values: Buffer, count: int, dtype: int, out: Buffer, /) -> None:
    """Writes the ``count`` values of ``dtype`` that ``values`` holds exactly into ``out`` (writable,
    exactly ``count`` values of the compute width, any alignment), converted as torch converts
    them; ValueError for any other length or an unknown code. The GIL is released."""

def pass1(values: Buffer, count: int, dtype: int, keys: Buffer, /) -> tuple[int, float, float, float, int, int, int]:
    """Finite count, sum, min, max, non-zero, NaN and Inf counts of the ``count`` values of
    ``dtype`` that ``values`` holds exactly (ValueError otherwise). Adds one to ``keys`` (a
    writable, int64-aligned buffer of exactly 65536 int64 counts) at the top 16 bits of each
    converted value's order-preserving key, NaN and Inf included; an empty ``keys`` (0 bytes)
    counts no key bins (the faster loop, moments only). The sums are of fixed lanes, so the result
    is the same as that of the values converted first and passed as their compute dtype."""

def pass2(
    values: Buffer,
    count: int,
    dtype: int,
    dirty: bool,
    mean: float,
    lo: float,
    scale: float,
    hist: Buffer,
    lut: Buffer,
    out: Buffer,
    collected: int,
    sub: Buffer,
    seeded: bool = False,
    /,
) -> tuple[float, float, int]:
    """Sums of (x - mean) and (x - mean)^2 of the finite values (all values unless ``dirty``) and
    the number of values in ``out`` afterwards. Adds their 64-bin histogram into ``hist``, a
    writable buffer of exactly 64 int64 counts; values outside [lo, hi] fall in the first or last
    bin.

    ``lut``: empty (no percentiles: ``out``, ``sub`` untouched, ``collected`` returned as passed)
    or exactly 65536 bytes, at most 18 of them non-zero (``MAX_WANTED`` in _kernel.c; all zero:
    nothing wanted): ``lut[top16(key)] = t`` wants the values of that key bin as wanted bin ``t``.
    With a non-empty ``out`` (writable, a whole number of values of the compute width,
    ``collected`` of them already there, ``-1 <= collected <= capacity``) their converted values
    are copied after those, in order (NaN and Inf skipped when ``dirty``); the result is -1 when
    they do not fit (or ``collected`` was -1), and nothing is written past the end. With an empty
    ``out`` they are counted into ``sub`` (writable, aligned, exactly ``max(lut) * 65536`` int64
    counts) at ``(t - 1) * 65536 +`` the next 16 bits of their key. Any other buffer or an unknown
    ``dtype`` raises ValueError (TypeError for a read-only or non-buffer argument).

    ``seeded``: ``hist`` already holds these values' histogram (``hist_of_keys``), so none is
    counted; only for bfloat16 and the float8 dtypes (ValueError for any other)."""

def hist_of_keys(keys: Buffer, dtype: int, lo: float, scale: float, hist: Buffer, /) -> None:
    """Adds pass 1's key bins (``keys``: exactly 65536 aligned int64 counts) of a dtype whose
    values are their key bins' own (bfloat16, float8_e4m3fn, float8_e5m2; ValueError for any
    other) into ``hist`` (exactly 64 int64 counts): each key bin's count in the bin of its value,
    binned in float64 as pass 2's checking loop bins ((v - lo) * scale clamped to [0, 63]); the
    key bins of NaN and Inf are left out. The GIL is released."""
