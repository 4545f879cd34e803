"""Types of the optional C kernel (``_kernel.c``); ``kernel_engine.load_kernel`` imports it."""

SOURCE_SHA256: str

def pass1(address: int, count: int, is_double: bool, /) -> tuple[int, float, float, float, int, int, int]:
    """Finite count, sum, min, max, non-zero, NaN and Inf counts of ``count`` float32 (or float64)
    values at ``address``."""

def pass2(
    address: int,
    count: int,
    is_double: bool,
    dirty: bool,
    mean: float,
    lo: float,
    scale: float,
    hist_address: int,
    /,
) -> tuple[float, float]:
    """Sums of (x - mean) and (x - mean)^2 of the finite values; adds their 64-bin histogram into
    the int64 array at ``hist_address``."""
