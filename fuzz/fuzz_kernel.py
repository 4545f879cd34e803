"""Fuzz the optional C stats kernel (``ckptscope.stats._kernel``) with arbitrary calls.

    python -m fuzz.fuzz_kernel [libFuzzer flags] [CORPUS_DIR ...]

Each input is decoded (``atheris.FuzzedDataProvider``) into one ``pass1`` or ``pass2`` call: the
values as raw bit patterns or picked floats (NaN, +-Inf, the float32/float64 extremes, denormals,
values far outside [lo, hi]), tiled past the kernel's 2048-value blocks; the buffer as bytes, a
bytearray, an array, a read-only, misaligned, non-contiguous or wrongly typed view, or the last
(or first) bytes of a mapping next to a PROT_NONE page, so a read or write one byte past either end
faults at once even without ASan; the count exact, off by a few, negative, huge, wrapping
``count * itemsize`` round to the buffer's length, or not an int; ``pass2``'s mean/lo/scale from
the values (as the engine computes them) or arbitrary (NaN, Inf, negative, out-of-range ints); the
histogram the right size or not, writable or not, misaligned (refused: int64 counts are stored
through an ``int64_t *``), strided, aliasing the values, inside canary bytes.

A call must return or raise ValueError/TypeError/OverflowError (or, for a strided values view, the
BufferError CPython's argument parsing passes on), and it must return exactly when the arguments
are valid (returning for a buffer shorter than ``count`` values means it read past it). The
histogram starts at zero or at counts up to 2**40 (adding to counts near 2**63 would overflow
int64, which the kernel does not check). A returned result must match a plain-Python reference:
pass 1's counts, min and max exactly, its sum within rounding; pass 2's histogram bin for bin (so
the counts add up to the values added and none is negative), its centred sums within rounding.
The values buffer is never written, the histogram only by a call that returns, the canaries never.
Anything else is a finding: the harness raises and libFuzzer saves the input.

The kernel module is C, which atheris does not instrument (that needs ``-fsanitize=fuzzer``); the
harness's own branches (which the kernel's answers steer) are, and ``fuzz/sanitized_kernel.py``
covers memory errors: ``CKPTSCOPE_FUZZ_KERNEL=PATH`` loads that build instead of the installed one
(``scripts/fuzz.sh`` replays the corpus through it with libasan preloaded).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from array import array
from pathlib import Path
from types import ModuleType
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BINS = 64
HIST_BYTES = BINS * 8
MAX_VALUES = 8192  # four of the kernel's 2048-value blocks
PAGE = mmap.PAGESIZE
NAN, INF = math.nan, math.inf
INTERESTING = [
    0.0, -0.0, 1.0, -1.0, 0.5, 63.0, 63.9, 64.0, 65.0, 1e-3, -3e9,
    1e16, 2.0**24 + 1, 2.0**53 + 1, 1e30, 1e-36, 1e300, -1e300,
    3.0e38, -3.0e38, 3.4028234663852886e38, 1.1754943508222875e-38, 1e-45,
    1.7976931348623157e308, -1.7976931348623157e308, 2.2250738585072014e-308, 5e-324,
    NAN, -NAN, INF, -INF,
]  # fmt: skip
REPEATS = [1, 1, 1, 1, 2, 3, 7, 31, 33, 129, 2047, 2049, 4096]
INVALID_OBJECTS: list[Any] = [None, "abc", 3, 1.5, [1.0, 2.0], (1.0,), object()]
EXPECTED = (ValueError, TypeError, OverflowError)
# PyArg_ParseTuple's y* keeps the BufferError a strided view raises (w* turns it into TypeError):
# the one other exception taken, and only for a values buffer that is not C-contiguous
STRIDED_VALUES = BufferError
SSIZE_MAX = 2**63 - 1
CANARY = 0xA5


class Finding(AssertionError):
    """A kernel call that broke the contract."""


def load_kernel() -> ModuleType:
    path = os.environ.get("CKPTSCOPE_FUZZ_KERNEL")
    if path:
        from fuzz.sanitized_kernel import load

        return load(Path(path))
    import hashlib
    import importlib

    try:
        kernel = importlib.import_module("ckptscope.stats._kernel")
    except ImportError as exc:
        sys.exit(f"fuzz_kernel: the C kernel is not built ({exc}); pip install -e . with a C compiler")
    source = ROOT / "ckptscope" / "stats" / "_kernel.c"
    if getattr(kernel, "SOURCE_SHA256", None) != hashlib.sha256(source.read_bytes()).hexdigest():
        sys.exit("fuzz_kernel: the built kernel is older than _kernel.c; pip install -e . to rebuild it")
    return kernel


class Guarded:
    """A read-write mapping with a PROT_NONE page before and after ``size`` usable bytes."""

    def __init__(self, size: int) -> None:
        self.pages = -(-size // PAGE)
        self.mm = mmap.mmap(-1, (self.pages + 2) * PAGE)
        self._pin = ctypes.c_char.from_buffer(self.mm)  # exports the mapping: it is never closed
        base = ctypes.addressof(self._pin)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for page in (0, self.pages + 1):
            if libc.mprotect(base + page * PAGE, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        self.view = memoryview(self.mm)

    def holding(self, data: bytes, at_end: bool) -> memoryview:
        """``data`` placed flush against the guard page after it (or before it)."""
        start = (self.pages + 1) * PAGE - len(data) if at_end else PAGE
        self.view[start : start + len(data)] = data
        return self.view[start : start + len(data)]


GUARDED_VALUES = Guarded(MAX_VALUES * 8 + 8)
GUARDED_HIST = Guarded(HIST_BYTES + 64)


def raw_bytes(obj: Any) -> bytes | None:
    """The bytes an object's buffer holds (None: not a buffer)."""
    try:
        with memoryview(obj) as view:
            return view.tobytes()
    except TypeError:
        return None


def is_contiguous_buffer(obj: Any, writable: bool) -> bool:
    try:
        with memoryview(obj) as view:
            return view.c_contiguous and (not writable or not view.readonly)
    except TypeError:
        return False


def aligned_for_int64(obj: Any) -> bool:
    """Whether a writable buffer starts at an address int64 counts may live at (the kernel
    refuses a histogram that does not)."""
    try:
        pin = ctypes.c_char.from_buffer(obj)
    except (TypeError, ValueError):
        return False
    try:
        return ctypes.addressof(pin) % 8 == 0
    finally:
        del pin


def as_float(x: Any) -> float | None:
    """What the ``d`` argument format makes of ``x`` (None: it raises)."""
    if type(x) is float:
        return x
    if type(x) is int or type(x) is bool:
        try:
            return float(x)
        except OverflowError:
            return None
    return None


def as_ssize(x: Any) -> int | None:
    """What the ``n`` argument format makes of ``x`` (None: it raises)."""
    if (type(x) is int or type(x) is bool) and -(2**63) <= x <= SSIZE_MAX:
        return int(x)
    return None


def f32(values: list[float]) -> list[float]:
    """Each double rounded to float32 (overflow to +-Inf), as a C cast does."""
    return array("f", values).tolist()


# --- decoding one input into a call -------------------------------------------------------------


@atheris.instrument_func
def make_values(fdp: atheris.FuzzedDataProvider, is_double: bool) -> bytes:
    item = 8 if is_double else 4
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # raw bit patterns: every NaN payload, denormal, odd length
        raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    else:
        values = []
        for _ in range(fdp.ConsumeIntInRange(0, 48)):
            if fdp.ConsumeBool():
                values.append(fdp.PickValueInList(INTERESTING))
            elif mode == 1:
                values.append(fdp.ConsumeRegularFloat())
            else:
                values.append(fdp.ConsumeFloat())
        raw = array("d" if is_double else "f", values).tobytes()
    repeat = fdp.PickValueInList(REPEATS)
    if raw and len(raw) * repeat > MAX_VALUES * item:
        repeat = max(1, MAX_VALUES * item // len(raw))
    return raw * repeat


@atheris.instrument_func
def make_buffer(fdp: atheris.FuzzedDataProvider, raw: bytes, is_double: bool) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 0:
        return bytes(raw)
    if kind == 1:
        return bytearray(raw)
    if kind == 2:
        return memoryview(bytearray(raw))
    if kind == 3:  # misaligned for any element type
        off = fdp.ConsumeIntInRange(1, 7)
        holder = bytearray(off) + bytearray(raw)
        return memoryview(holder)[off:]
    if kind == 4:  # an array of the right (or another) element type
        for code in ("d", "f") if is_double else ("f", "d"):
            if len(raw) % array(code).itemsize == 0 and fdp.ConsumeBool():
                return array(code, raw)
        return array("B", raw)
    if kind == 5:  # a typed, multi-dimensional view (still C-contiguous)
        view = memoryview(bytearray(raw))
        if len(raw) % 8 == 0 and len(raw) >= 16:
            return view.cast("B", [2, len(raw) // 2])
        return view
    if kind == 6:
        return memoryview(bytearray(raw)).toreadonly()
    if kind == 7:  # strided: only a view of at most one element is contiguous
        step = fdp.ConsumeIntInRange(2, 3)
        return memoryview(bytearray(raw * step))[::step]
    if kind == 8:
        return fdp.PickValueInList(INVALID_OBJECTS)
    if kind in (9, 10):  # against a guard page
        return GUARDED_VALUES.holding(raw, at_end=kind == 9)
    return bytes(raw) if fdp.ConsumeBool() else bytearray(raw)


@atheris.instrument_func
def make_count(fdp: atheris.FuzzedDataProvider, nbytes: int, item: int) -> Any:
    exact = nbytes // item
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 3:
        return exact
    if kind == 4:
        return exact + fdp.ConsumeIntInRange(-3, 3)
    if kind == 5:
        return fdp.ConsumeIntInRange(-(2**63), SSIZE_MAX)
    if kind == 6:  # count * itemsize wraps round to the buffer's length (or near it)
        return (2**64 + nbytes) // item + fdp.ConsumeIntInRange(-1, 1)
    if kind == 7:
        return fdp.PickValueInList([SSIZE_MAX, SSIZE_MAX // item, SSIZE_MAX // item + 1, 2**62, -(2**63), 2**63, 2**64])
    if kind == 8:
        return fdp.PickValueInList([float(exact), str(exact), None, True, False, exact + 0.5])
    return -fdp.ConsumeIntInRange(1, 2**40)


@atheris.instrument_func
def make_float(fdp: atheris.FuzzedDataProvider, natural: float) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 3:
        return natural
    if kind == 4:
        return fdp.PickValueInList(INTERESTING)
    if kind == 5:
        return fdp.ConsumeFloat()
    if kind == 6:
        return fdp.PickValueInList([0, 1, -1, 64, 2**1030, -(2**1030), True])
    return fdp.PickValueInList(INVALID_OBJECTS + [complex(1, 1)])


class Hist:
    """The histogram argument, and where its bytes and canaries are to be checked afterwards."""

    def __init__(self, obj: Any, holder: Any = None, inside: tuple[int, int] | None = None) -> None:
        self.obj = obj
        self.holder = holder  # a bytearray with canary bytes round ``obj`` (its byte range ``inside``)
        self.inside = inside
        self.before = raw_bytes(obj)
        self.holder_before = bytes(holder) if holder is not None else None

    def canaries_intact(self) -> bool:
        if self.holder is None or self.inside is None or self.holder_before is None:
            return True
        a, b = self.inside
        now = bytes(self.holder)
        return now[:a] == self.holder_before[:a] and now[b:] == self.holder_before[b:]


@atheris.instrument_func
def make_hist(fdp: atheris.FuzzedDataProvider, values: Any) -> Hist:
    if fdp.ConsumeIntInRange(0, 3) == 0:
        start = array("q", [fdp.ConsumeIntInRange(0, 2**40) for _ in range(BINS)])
    else:
        start = array("q", bytes(HIST_BYTES))
    initial = start.tobytes()
    kind = fdp.ConsumeIntInRange(0, 12)
    if kind <= 2:
        return Hist(start)
    if kind in (3, 4):  # inside canaries, maybe misaligned
        before = fdp.ConsumeIntInRange(0, 15) if kind == 4 else 16
        holder = bytearray([CANARY]) * (before + HIST_BYTES + 16)
        holder[before : before + HIST_BYTES] = initial
        return Hist(memoryview(holder)[before : before + HIST_BYTES], holder, (before, before + HIST_BYTES))
    if kind in (5, 6):  # against a guard page
        return Hist(GUARDED_HIST.holding(initial, at_end=kind == 5))
    if kind == 7:  # the wrong size, inside canaries
        size = fdp.ConsumeIntInRange(0, HIST_BYTES + 16)
        holder = bytearray([CANARY]) * (size + 32)
        return Hist(memoryview(holder)[16 : 16 + size], holder, (16, 16 + size))
    if kind == 8:
        return Hist(array("q", [0] * fdp.PickValueInList([0, 1, 63, 65, 128])))
    if kind == 9:  # read-only
        return Hist(bytes(initial) if fdp.ConsumeBool() else memoryview(bytearray(initial)).toreadonly())
    if kind == 10:  # strided: 64 int64 slots, every other one
        return Hist(memoryview(bytearray(initial * 2)).cast("q")[::2])
    if kind == 11:  # the values buffer itself
        return Hist(values)
    if fdp.ConsumeBool():
        return Hist(array("d", bytes(HIST_BYTES)))  # 512 bytes of another type: valid
    return Hist(fdp.PickValueInList(INVALID_OBJECTS))


# --- the reference ------------------------------------------------------------------------------


def exact_sum(values: list[float]) -> float | None:
    """The correctly rounded sum, or None where it lies a hair beyond the float range (the
    rounded sum of magnitudes can still be finite there)."""
    try:
        return math.fsum(values)
    except OverflowError:
        return None


def check_pass1(result: tuple[Any, ...], vals: list[float]) -> None:
    finite_n, total, lo, hi, nonzero, nan, inf = result
    finite = [v for v in vals if math.isfinite(v)]
    want = (len(finite), sum(v != 0.0 for v in vals), sum(math.isnan(v) for v in vals))
    got = (finite_n, nonzero, nan)
    if got != want or inf != len(vals) - len(finite) - want[2]:
        raise Finding(f"pass1 counts (finite, nonzero, nan) {got}, inf {inf}; expected {want}")
    if finite:
        if lo != min(finite) or hi != max(finite):
            raise Finding(f"pass1 min/max {lo!r}/{hi!r}, expected {min(finite)!r}/{max(finite)!r}")
        scale = sum(abs(v) for v in finite)
        want_sum = exact_sum(finite) if math.isfinite(scale) else None
        if want_sum is not None and not abs(total - want_sum) <= 1e-9 * scale:
            raise Finding(f"pass1 sum {total!r}, expected {want_sum!r}")
    elif (total, lo, hi) != (0.0, INF, -INF):
        raise Finding(f"pass1 of no finite values gave sum/min/max {total!r}/{lo!r}/{hi!r}")


def bins_double(vals: list[float], lo: float, scale: float) -> list[int]:
    out = []
    for v in vals:
        t = (v - lo) * scale
        t = t if t > 0.0 else 0.0
        out.append(int(t if t < BINS - 1.0 else BINS - 1.0))
    return out


def bins_float(vals: list[float], lo: float, scale: float) -> list[int]:
    """The kernel's float32 path: (v - lo32) * scale32 in float32 (double then rounding is exact
    for one operation on float32 operands)."""
    (lo32, scale32) = f32([lo, scale])
    products = f32([d * scale32 for d in f32([v - lo32 for v in vals])])
    out = []
    for t in products:
        t = t if t > 0.0 else 0.0
        out.append(int(t if t < BINS - 1.0 else BINS - 1.0))
    return out


def check_pass2(
    result: tuple[Any, ...], vals: list[float], is_double: bool, dirty: bool, mean: float, lo: float, scale: float
) -> list[int]:
    """Checks the centred sums; returns the histogram counts the call must have added."""
    included = [v for v in vals if math.isfinite(v)] if dirty else vals
    if is_double or dirty or not 1e-36 < scale < 1e30:
        ids = bins_double(included, lo, scale)
    else:
        ids = bins_float(included, lo, scale)
    counts = [0] * BINS
    for i in ids:
        counts[i] += 1
    shift, css = result
    ds = [v - mean for v in included]
    if all(math.isfinite(d) for d in ds):
        squares = [d * d for d in ds]
        size, sq_sum = sum(abs(d) for d in ds), sum(squares)
        want_shift = exact_sum(ds) if math.isfinite(size) else None
        if want_shift is not None and not abs(shift - want_shift) <= 1e-9 * size:
            raise Finding(f"pass2 shift {shift!r}, expected {want_shift!r}")
        want_css = exact_sum(squares) if math.isfinite(sq_sum) else None
        if want_css is not None and not abs(css - want_css) <= 1e-9 * sq_sum:
            raise Finding(f"pass2 css {css!r}, expected {want_css!r}")
    return counts


# --- one input ----------------------------------------------------------------------------------


def allowed(exc: BaseException, buffer: Any) -> bool:
    if isinstance(exc, EXPECTED):
        return True
    return isinstance(exc, STRIDED_VALUES) and isinstance(buffer, memoryview) and not buffer.c_contiguous


def values_valid(buffer: Any, count: Any, item: int) -> tuple[bool, bytes | None]:
    data = raw_bytes(buffer)
    n = as_ssize(count)
    ok = data is not None and is_contiguous_buffer(buffer, False) and n is not None and n >= 0
    return bool(ok and n is not None and data is not None and n * item == len(data)), data


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    second = fdp.ConsumeBool()
    is_double = fdp.ConsumeBool()
    item = 8 if is_double else 4
    raw = make_values(fdp, is_double)
    buffer = make_buffer(fdp, raw, is_double)
    count = make_count(fdp, len(raw_bytes(buffer) or b""), item)
    valid, snapshot = values_valid(buffer, count, item)
    vals = array("d" if is_double else "f", snapshot).tolist() if valid and snapshot is not None else []

    if not second:
        try:
            result = KERNEL.pass1(buffer, count, is_double)
        except Exception as exc:
            if not allowed(exc, buffer):
                raise
            if valid:
                raise Finding(f"pass1 refused a valid call: {type(exc).__name__}: {exc}") from exc
        else:
            if not valid:
                raise Finding(f"pass1 returned {result!r} for an invalid call (count {count!r})")
            check_pass1(result, vals)
        if raw_bytes(buffer) != snapshot:
            raise Finding("pass1 wrote into the values buffer")
        return

    finite = [v for v in vals if math.isfinite(v)]
    lo0 = min(finite) if finite else 0.0
    hi0 = max(finite) if finite else 0.0
    natural_scale = min(BINS / (hi0 - lo0), 1e300) if hi0 > lo0 else 0.0
    dirty = fdp.ConsumeBool() if fdp.ConsumeIntInRange(0, 3) == 0 else len(finite) != len(vals)
    mean = make_float(fdp, sum(finite) / len(finite) if finite else 0.0)  # as the engine: may be inf
    lo = make_float(fdp, lo0)
    scale = make_float(fdp, natural_scale)
    hist = make_hist(fdp, buffer)

    fmean, flo, fscale = as_float(mean), as_float(lo), as_float(scale)
    hist_ok = (
        is_contiguous_buffer(hist.obj, True) and len(hist.before or b"") == HIST_BYTES and aligned_for_int64(hist.obj)
    )
    params_ok = (
        fmean is not None
        and flo is not None
        and fscale is not None
        and math.isfinite(flo)
        and math.isfinite(fscale)
        and fscale >= 0.0
    )
    valid2 = valid and hist_ok and params_ok
    try:
        result = KERNEL.pass2(buffer, count, is_double, dirty, mean, lo, scale, hist.obj)
    except Exception as exc:
        if not allowed(exc, buffer):
            raise
        if valid2:
            raise Finding(f"pass2 refused a valid call: {type(exc).__name__}: {exc}") from exc
        if raw_bytes(hist.obj) != hist.before:
            raise Finding("pass2 wrote into the histogram of a call it refused") from exc
    else:
        if not valid2:
            raise Finding(f"pass2 returned {result!r} for an invalid call (count {count!r})")
        assert fmean is not None and flo is not None and fscale is not None and hist.before is not None
        want = check_pass2(result, vals, is_double, dirty, fmean, flo, fscale)
        after = array("q", raw_bytes(hist.obj) or b"").tolist()
        added = [a - b for a, b in zip(after, array("q", hist.before).tolist(), strict=True)]
        if any(c < 0 for c in added) or sum(added) != sum(want):
            raise Finding(f"pass2 added {sum(added)} counts (some negative: {min(added) < 0}), expected {sum(want)}")
        if added != want:
            raise Finding(f"pass2 histogram {added}, expected {want}")
    if not hist.canaries_intact():
        raise Finding("pass2 wrote outside the histogram buffer")
    if hist.obj is not buffer and raw_bytes(buffer) != snapshot:
        raise Finding("pass2 wrote into the values buffer")


KERNEL = load_kernel()


def main() -> None:
    sys.stderr.write(f"fuzz_kernel: {getattr(KERNEL, '__file__', KERNEL)}\n")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
