"""Fuzz the optional C stats kernel (``ckptscope.stats._kernel``) with arbitrary calls.

    python -m fuzz.fuzz_kernel [libFuzzer flags] [CORPUS_DIR ...]

Each input is decoded (``atheris.FuzzedDataProvider``) into one ``pass1``, ``pass2`` (sometimes
``seeded``: then only bfloat16/float8 are taken and nothing is counted into the histogram),
``convert`` or ``hist_of_keys`` call (key counts of any shape into a histogram) of one dtype code
(any of ``DTYPES``, mostly float32/float64, or an unknown code, a huge one or not an int): the
values as raw bit patterns or picked values (NaN, +-Inf, the float32/float64 extremes, denormals,
values far outside [lo, hi]; for the other dtypes their NaN/Inf patterns and
integer extremes), tiled past the kernel's 2048-value blocks; the buffer as bytes, a
bytearray, an array, a read-only, misaligned, non-contiguous or wrongly typed view, or the last
(or first) bytes of a mapping next to a PROT_NONE page, so a read or write one byte past either end
faults at once even without ASan; the count exact, off by a few, negative, huge, wrapping
``count * itemsize`` round to the buffer's length (for 1-, 2-, 4- and 8-byte dtypes), or not an
int; pass 1's keys also empty (no key bins: the moments only); ``pass2``'s mean/lo/scale from
the values (as the engine computes them) or arbitrary (NaN, Inf, negative, out-of-range ints). The
count buffers (pass 1's 65536 ``keys``, pass 2's 64-bin histogram and its ``sub`` counts) come the
right size or not, writable or not, misaligned (refused: int64 counts are stored through an
``int64_t *``), strided, inside canary bytes or against a guard page, starting at zero or at
counts up to 2**40 (adding to counts near 2**63 would overflow int64, which the kernel does not
check). Pass 2's ``lut`` is empty (no percentiles), 65536 bytes marking bins the values fall in
(or any others) with small wanted-bin numbers (or large ones, up to 255), or the wrong size;
``out`` empty (count into ``sub``), room for exactly the wanted values, one too few (overflow),
more, not a whole number of values, misaligned, read-only; ``collected`` the values already there,
-1, out of range or not an int.

A call must return or raise ValueError/TypeError/OverflowError (or, for a strided values or lut
view, the BufferError CPython's argument parsing passes on for ``y*``), and it must return exactly
when the arguments are valid (returning for a buffer shorter than ``count`` values means it read
past it). The values are compared in the compute width (float64 for float64 and the integer and
bool dtypes, float32 for the others), converted by a numpy/Python reference of torch's conversion
(float16 NaNs quieted, float8_e4m3fn from its formula, bool any non-zero byte as 1); ``convert``
must write exactly those bits. A returned result must match a plain-Python reference: pass 1's
counts, min and max
exactly, its sum within rounding, its key counts bin for bin (the key: the value's bits with the
sign folded, negative -> every bit flipped, positive -> the sign bit set; its top 16 bits); pass 2's
histogram bin for bin (so the counts add up to the values added and none is negative), its centred
sums within rounding, and the wanted values (those whose key bin the lut marks, in order, skipping
NaN and Inf when ``dirty``): bit for bit after the ``collected`` already in ``out`` (which stay
untouched), the count -1 exactly when they do not fit; or counted into ``sub`` at
``(t - 1) * 65536 +`` the next 16 key bits. The values buffer and the lut are never written, the
count buffers and ``out`` only by a call that returns (``out`` only past ``collected``, ``sub``
only when counting), the canaries never. Anything else is a finding: the harness raises and
libFuzzer saves the input.

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
import re
import sys
from array import array
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import atheris  # type: ignore[import-untyped]
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BINS = 64
HIST_BYTES = BINS * 8
KEY_BINS = 65536  # pass 1's key counts; the lut's size; one wanted bin's sub-bin counts
KEY_BYTES = KEY_BINS * 8
SUB_MOST = 3  # the most wanted bins a lut marks when counting into sub (3 * 512 KiB of counts)
# the most bins a lut may mark (more: ValueError), as _kernel.c defines it
_WANTED = re.search(rb"#define MAX_WANTED (\d+)", (ROOT / "ckptscope" / "stats" / "_kernel.c").read_bytes())
MAX_WANTED = int(_WANTED.group(1)) if _WANTED else 18
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


def _e4m3fn(byte: int) -> int:
    """float8_e4m3fn's float32 bits, from the format (not from the kernel's formula): no Inf,
    S.1111.111 is NaN (c10 gives it the bits 0x7FF00000 with the sign)."""
    sign, exp, mant = byte >> 7, (byte >> 3) & 0xF, byte & 7
    if exp == 15 and mant == 7:
        return (sign << 31) | 0x7FF00000
    value = math.ldexp(mant / 8, -6) if exp == 0 else math.ldexp(1 + mant / 8, exp - 7)
    return int(np.array([-value if sign else value], np.float32).view(np.uint32)[0])


E4M3FN_BITS = np.array([_e4m3fn(b) for b in range(256)], np.uint32)


def _f16_to_f32_bits(halves: np.ndarray) -> np.ndarray:
    """torch's float16 -> float32: numpy's conversion, with a NaN quieted as c10 and F16C do."""
    out = halves.view(np.float16).astype(np.float32).view(np.uint32)
    return np.where(np.isnan(out.view(np.float32)), out | np.uint32(0x00400000), out)


def _to_compute(code: int, raw: bytes) -> bytes:
    """The bytes of the values of ``raw`` (stored as ``code``) in the compute width."""
    kind = DTYPE_KINDS[code]
    if kind in ("f", "d"):
        return raw
    if kind == "bf16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << np.uint32(16)).tobytes()
    if kind == "f16":
        return _f16_to_f32_bits(np.frombuffer(raw, np.uint16)).tobytes()
    if kind == "e5m2":
        return _f16_to_f32_bits(np.frombuffer(raw, np.uint8).astype(np.uint16) << np.uint16(8)).tobytes()
    if kind == "e4m3fn":
        return E4M3FN_BITS[np.frombuffer(raw, np.uint8)].tobytes()
    if kind == "bool":
        return (np.frombuffer(raw, np.uint8) != 0).astype(np.float64).tobytes()
    return np.frombuffer(raw, np.dtype(kind)).astype(np.float64).tobytes()


# code -> how it is stored: "f"/"d" (float32/float64), "f16", "bf16", "e4m3fn", "e5m2", "bool" or a
# numpy integer dtype name; its item size; whether it computes in float64
DTYPE_KINDS = {
    0: "f", 1: "d", 2: "f16", 3: "bf16", 4: "e4m3fn", 5: "e5m2", 6: "int8", 7: "uint8", 8: "int16",
    9: "uint16", 10: "int32", 11: "uint32", 12: "int64", 13: "uint64", 14: "bool",
}  # fmt: skip
ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1, 8: 2, 9: 2, 10: 4, 11: 4, 12: 8, 13: 8, 14: 1}
COMPUTES_DOUBLE = {c: c == 1 or c >= 6 for c in DTYPE_KINDS}
SEEDABLE = frozenset({3, 4, 5})  # bfloat16, float8_e4m3fn, float8_e5m2: values that are their key bins'
# stored bit patterns worth trying per item size (NaN, Inf, zeros, extremes of the integers)
PATTERNS = {
    1: [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x7E, 0xFE, 0x7C, 0xFC, 0x08, 0x07],
    2: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFE00, 0x7F80, 0xFF80, 0x7F81, 0x7FC0, 0x0001,
        0x03FF, 0x0080, 0x007F, 0x3F80, 0x3C00, 0x7BFF, 0x7F7F, 0xFFFF, 0x7FFF],
    4: [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F800000],
    8: [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**53 + 1, 2**63 - 2**10 + 1, 0x7FF0000000000000, 0x3FF0000000000000],
}  # fmt: skip
BAD_DTYPES: list[Any] = [-1, 15, 16, 255, 2**31, -(2**31) - 1, 2**63, 1.0, None, "float32", True, False]


F = TypeVar("F", bound=Callable[..., Any])


def instrument(func: F) -> F:
    """``atheris.instrument_func``, typed (atheris ships no stubs)."""
    return cast(F, atheris.instrument_func(func))


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
GUARDED_KEYS = Guarded(KEY_BYTES + 64)
GUARDED_LUT = Guarded(KEY_BINS + 64)
GUARDED_OUT = Guarded((MAX_VALUES + 2048 + 16) * 8)  # the most make_out asks for
GUARDED_SUB = Guarded(SUB_MOST * KEY_BYTES + 64)


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


def address_of(obj: Any) -> int | None:
    """Where a C-contiguous buffer starts, even an empty one (None: not one)."""
    try:
        view = memoryview(obj)
    except TypeError:
        return None
    try:
        if not view.c_contiguous:
            return None
        with view.cast("B") as flat:
            pinned = np.frombuffer(flat, dtype=np.uint8)
            address = int(pinned.ctypes.data)
            del pinned
            return address
    finally:
        view.release()


def aligned_for_int64(obj: Any) -> bool:
    """Whether a buffer starts at an address int64 counts may live at (the kernel refuses count
    buffers that do not, even empty ones)."""
    address = address_of(obj)
    return address is not None and address % 8 == 0


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


@instrument
def make_dtype(fdp: atheris.FuzzedDataProvider) -> tuple[Any, int | None]:
    """The dtype argument and the code it stands for (None: the kernel must refuse it)."""
    kind = fdp.ConsumeIntInRange(0, 15)
    if kind <= 5:  # float32/float64, the codes of the engine's old bool
        return (kind % 2, kind % 2) if kind < 4 else (bool(kind % 2), kind % 2)
    if kind <= 13:
        code = fdp.ConsumeIntInRange(2, 14)
        return code, code
    bad = fdp.PickValueInList(BAD_DTYPES)
    return bad, (int(bad) if type(bad) is bool else None)


@instrument
def make_values(fdp: atheris.FuzzedDataProvider, code: int) -> bytes:
    item = ITEMSIZE[code]
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # raw bit patterns: every NaN payload, denormal, odd length
        raw = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)))
    elif code > 1:  # another dtype: its interesting patterns and random ones
        words = []
        for _ in range(fdp.ConsumeIntInRange(0, 48)):
            if fdp.ConsumeBool():
                words.append(fdp.PickValueInList(PATTERNS[item]))
            else:
                words.append(fdp.ConsumeIntInRange(0, 2 ** (8 * item) - 1))
        raw = b"".join(w.to_bytes(item, "little") for w in words)
    else:
        values = []
        for _ in range(fdp.ConsumeIntInRange(0, 48)):
            if fdp.ConsumeBool():
                values.append(fdp.PickValueInList(INTERESTING))
            elif mode == 1:
                values.append(fdp.ConsumeRegularFloat())
            else:
                values.append(fdp.ConsumeFloat())
        raw = array("d" if code == 1 else "f", values).tobytes()
    repeat = int(fdp.PickValueInList(REPEATS))
    if raw and len(raw) * repeat > MAX_VALUES * item:
        repeat = max(1, MAX_VALUES * item // len(raw))
    return raw * repeat


@instrument
def make_buffer(fdp: atheris.FuzzedDataProvider, raw: bytes, item: int) -> Any:
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
        typecodes = {1: "b", 2: "h", 4: "f", 8: "d"}
        for code in (typecodes[item], "d", "f", "h"):
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


@instrument
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


@instrument
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


class Region:
    """One buffer argument, and where its bytes and canaries are to be checked afterwards."""

    def __init__(self, obj: Any, holder: Any = None, inside: tuple[int, int] | None = None) -> None:
        self.obj = obj
        self.holder = holder  # a bytearray with canary bytes round ``obj`` (its byte range ``inside``)
        self.inside = inside
        self.before = raw_bytes(obj)
        self.holder_before = bytes(holder) if holder is not None else None

    def unchanged(self) -> bool:
        return raw_bytes(self.obj) == self.before

    def canaries_intact(self) -> bool:
        if self.holder is None or self.inside is None or self.holder_before is None:
            return True
        a, b = self.inside
        now = bytes(self.holder)
        return now[:a] == self.holder_before[:a] and now[b:] == self.holder_before[b:]

    def writable_counts(self, bins: int) -> bool:
        """Whether the kernel must take it as ``bins`` int64 counts (w*, exact size, aligned)."""
        return (
            is_contiguous_buffer(self.obj, True) and len(self.before or b"") == bins * 8 and aligned_for_int64(self.obj)
        )


def in_canaries(fdp: atheris.FuzzedDataProvider, initial: bytes, misalign: bool) -> Region:
    before = fdp.ConsumeIntInRange(0, 15) if misalign else 16
    holder = bytearray([CANARY]) * (before + len(initial) + 16)
    holder[before : before + len(initial)] = initial
    return Region(memoryview(holder)[before : before + len(initial)], holder, (before, before + len(initial)))


@instrument
def make_counts(fdp: atheris.FuzzedDataProvider, bins: int, guarded: Guarded, values: Any = None) -> Region:
    """A buffer for ``bins`` int64 counts (pass 1's keys, pass 2's histogram and sub counts):
    mostly right, often not."""
    if bins == 0:
        return Region(bytearray() if fdp.ConsumeBool() else memoryview(bytearray(8))[8:])
    if fdp.ConsumeIntInRange(0, 3) == 0:
        if bins <= BINS:
            start = array("q", [fdp.ConsumeIntInRange(0, 2**40) for _ in range(bins)])
        else:  # a few bins started, the rest at one base count
            start = array("q", [fdp.ConsumeIntInRange(0, 2**40)]) * bins
            for _ in range(fdp.ConsumeIntInRange(0, 8)):
                start[fdp.ConsumeIntInRange(0, bins - 1)] = fdp.ConsumeIntInRange(0, 2**40)
    else:
        start = array("q", bytes(bins * 8))
    initial = start.tobytes()
    kind = fdp.ConsumeIntInRange(0, 12)
    if kind <= 2:
        return Region(start)
    if kind in (3, 4):  # inside canaries, maybe misaligned
        return in_canaries(fdp, initial, misalign=kind == 4)
    if kind in (5, 6):  # against a guard page
        return Region(guarded.holding(initial, at_end=kind == 5))
    if kind == 7:  # the wrong size, inside canaries
        size = fdp.PickValueInList([0, 8, bins * 8 - 8, bins * 8 - 1, bins * 8 + 1, bins * 8 + 8])
        size = size if size >= 0 else 0
        holder = bytearray([CANARY]) * (size + 32)
        return Region(memoryview(holder)[16 : 16 + size], holder, (16, 16 + size))
    if kind == 8:
        return Region(array("q", [0] * fdp.PickValueInList([0, 1, bins - 1, bins + 1, 2 * bins])))
    if kind == 9:  # read-only
        return Region(bytes(initial) if fdp.ConsumeBool() else memoryview(bytearray(initial)).toreadonly())
    if kind == 10:  # strided: the slots, every other one
        return Region(memoryview(bytearray(initial * 2)).cast("q")[::2])
    if kind == 11 and values is not None:  # the values buffer itself
        return Region(values)
    if fdp.ConsumeBool():
        return Region(array("d", bytes(bins * 8)))  # the right size in another type: valid
    return Region(fdp.PickValueInList(INVALID_OBJECTS))


# --- pass 2's wanted key bins -------------------------------------------------------------------


def key_bins(snapshot: bytes, is_double: bool) -> tuple[list[int], list[int], list[bool]]:
    """The top and the next 16 bits of each value's order-preserving key, and whether it is
    finite: from the value's bits (negative: every bit flipped, positive: the sign bit set)."""
    if is_double:
        bits = array("Q", snapshot).tolist()
        keys = [b ^ 0xFFFFFFFFFFFFFFFF if b >> 63 else b | 1 << 63 for b in bits]
        finite = [(b >> 52) & 0x7FF != 0x7FF for b in bits]
        return [k >> 48 for k in keys], [(k >> 32) & 0xFFFF for k in keys], finite
    bits = array("I", snapshot).tolist()
    keys = [b ^ 0xFFFFFFFF if b >> 31 else b | 1 << 31 for b in bits]
    finite = [(b >> 23) & 0xFF != 0xFF for b in bits]
    return [k >> 16 for k in keys], [k & 0xFFFF for k in keys], finite


@instrument
def check_keys(keys: Region, tops: list[int]) -> None:
    """pass1 added one count to each value's top-16 key bin, nothing else."""
    want = array("q", keys.before or b"")
    for top in tops:
        want[top] += 1
    after = raw_bytes(keys.obj) or b""
    if after != want.tobytes():
        got = array("q", after)
        wrong = [(b, got[b], want[b]) for b in range(KEY_BINS) if got[b] != want[b]][:8]
        raise Finding(f"pass1 key counts wrong at (bin, got, expected) {wrong}")


@instrument
def make_lut(fdp: atheris.FuzzedDataProvider, tops: list[int]) -> Region:
    kind = fdp.ConsumeIntInRange(0, 9)  # 0 (all an exhausted input gives): a valid lut
    if kind == 7:
        return Region(fdp.PickValueInList([b"", bytearray(), memoryview(b"")]))  # no percentiles
    if kind == 8:  # the wrong size
        size = fdp.PickValueInList([1, 255, KEY_BINS - 1, KEY_BINS + 1, 2 * KEY_BINS])
        return Region(bytes([1]) * size)
    if kind == 9:
        return Region(fdp.PickValueInList(INVALID_OBJECTS))
    lut = bytearray(KEY_BINS)
    if kind == 4 and fdp.ConsumeBool():  # about as many wanted bins as the kernel takes
        many = fdp.PickValueInList([MAX_WANTED - 1, MAX_WANTED, MAX_WANTED + 1, 255, 256, 1000])
        step = KEY_BINS // many
        for i in range(many):
            lut[i * step + fdp.ConsumeIntInRange(0, step - 1)] = 1
    big = kind == 6  # wanted-bin numbers past what a sub buffer here holds (up to 255)
    for _ in range(fdp.ConsumeIntInRange(0 if kind == 5 else 1, MAX_WANTED + 2)):  # 5: maybe none
        if tops and fdp.ConsumeIntInRange(0, 3) != 3:  # a bin some values fall in
            b = fdp.PickValueInList(tops)
        else:
            b = fdp.ConsumeIntInRange(0, KEY_BINS - 1)
        lut[b] = fdp.ConsumeIntInRange(1, 255) if big else fdp.ConsumeIntInRange(1, SUB_MOST)
    shape = fdp.ConsumeIntInRange(0, 6)
    if shape == 0:
        return Region(bytearray(lut))
    if shape == 1:
        return Region(memoryview(bytearray(lut)).toreadonly())
    if shape == 2:  # misaligned
        holder = bytearray(3) + lut
        return Region(memoryview(holder)[3:])
    if shape == 3:
        return Region(GUARDED_LUT.holding(bytes(lut), at_end=fdp.ConsumeBool()))
    if shape == 4:  # strided (y*: BufferError)
        return Region(memoryview(bytes(lut) * 2)[::2])
    return Region(bytes(lut))


def fill(n: int) -> bytes:
    """A recognisable pattern of ``n`` bytes for the collection buffer's old contents."""
    return (b"\x5a\xc3\x3c\xa5" * (n // 4 + 1))[:n]


@instrument
def make_out(fdp: atheris.FuzzedDataProvider, prefix: int, wanted: int, item: int) -> Region:
    """The collection buffer: ``prefix`` values already there, room for the ``wanted`` ones or
    not."""
    kind = (fdp.ConsumeIntInRange(0, 12) + 4) % 13  # an exhausted input: room, in canaries
    if kind <= 2:  # count into sub instead
        return Region(bytearray() if kind < 2 else memoryview(bytearray(8))[8:])
    delta = fdp.PickValueInList([0, 0, 0, 1, 7, 2048, -1, -1, -2, -wanted])
    cap = max(0, prefix + wanted + delta)
    nbytes = cap * item
    if kind == 3:  # not a whole number of values
        nbytes += fdp.ConsumeIntInRange(1, item - 1)
    initial = fill(nbytes)
    if kind in (3, 4, 5):  # inside canaries, maybe misaligned (the kernel stores with memcpy)
        return in_canaries(fdp, initial, misalign=kind == 5)
    if kind in (6, 7):
        return Region(GUARDED_OUT.holding(initial, at_end=kind == 6))
    if kind == 8:  # read-only
        return Region(bytes(initial))
    if kind == 9:  # strided (w*: TypeError)
        return Region(memoryview(bytearray(initial * 2))[::2])
    if kind == 10:
        return Region(fdp.PickValueInList(INVALID_OBJECTS))
    if kind == 11 and nbytes % 8 == 0:  # an array of some type
        return Region(array("d" if fdp.ConsumeBool() else "f", initial))
    return Region(bytearray(initial))


@instrument
def make_collected(fdp: atheris.FuzzedDataProvider, prefix: int, cap: int) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 4:
        return prefix
    if kind == 5:
        return -1
    if kind == 6:
        return fdp.PickValueInList([cap, cap + 1, -2, 0])
    if kind == 7:
        return fdp.ConsumeIntInRange(-(2**63), SSIZE_MAX)
    if kind == 8:
        return fdp.PickValueInList([2**63, -(2**63) - 1, float(prefix), None, True, str(prefix)])
    return fdp.ConsumeIntInRange(-3, cap + 3)


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


def allowed(exc: BaseException, *read_only_buffers: Any) -> bool:
    """An exception a refused call may raise (BufferError only from a strided ``y*`` argument)."""
    if isinstance(exc, EXPECTED):
        return True
    return isinstance(exc, STRIDED_VALUES) and any(
        isinstance(b, memoryview) and not b.c_contiguous for b in read_only_buffers
    )


def values_valid(buffer: Any, count: Any, item: int) -> tuple[bool, bytes | None]:
    data = raw_bytes(buffer)
    n = as_ssize(count)
    ok = data is not None and is_contiguous_buffer(buffer, False) and n is not None and n >= 0
    return bool(ok and n is not None and data is not None and n * item == len(data)), data


def empty_writable(obj: Any) -> bool:
    """An empty writable contiguous buffer: pass 1 then counts no key bins (alignment unchecked)."""
    return is_contiguous_buffer(obj, True) and raw_bytes(obj) == b""


@instrument
def call_pass1(
    fdp: atheris.FuzzedDataProvider, buffer: Any, count: Any, dtype: Any, wide: bytes | None, is_double: bool,
    valid: bool,
) -> None:  # fmt: skip
    snapshot = raw_bytes(buffer)
    vals = array("d" if is_double else "f", wide).tolist() if valid and wide is not None else []
    keys = Region(bytearray()) if fdp.ConsumeIntInRange(0, 5) == 0 else make_counts(fdp, KEY_BINS, GUARDED_KEYS)
    keyed = keys.writable_counts(KEY_BINS)
    valid1 = valid and (keyed or empty_writable(keys.obj))
    try:
        result = KERNEL.pass1(buffer, count, dtype, keys.obj)
    except Exception as exc:
        if not allowed(exc, buffer):
            raise
        if valid1:
            raise Finding(f"pass1 refused a valid call: {type(exc).__name__}: {exc}") from exc
        if not keys.unchanged():
            raise Finding("pass1 wrote into the key counts of a call it refused") from exc
    else:
        if not valid1:
            raise Finding(f"pass1 returned {result!r} for an invalid call (count {count!r})")
        check_pass1(result, vals)
        check_keys(keys, key_bins(wide or b"", is_double)[0] if keyed else [])
    if not keys.canaries_intact():
        raise Finding("pass1 wrote outside the key counts buffer")
    if raw_bytes(buffer) != snapshot:
        raise Finding("pass1 wrote into the values buffer")


@instrument
def call_convert(
    fdp: atheris.FuzzedDataProvider, buffer: Any, count: Any, dtype: Any, wide: bytes | None, item: int,
    valid: bool,
) -> None:  # fmt: skip
    """``convert`` writes exactly the reference's compute-width bits, and nothing for a refused call."""
    snapshot = raw_bytes(buffer)
    want = wide if valid and wide is not None else b""
    delta = fdp.PickValueInList([0, 0, 0, 0, -1, 1, -item, item])
    size = max(0, len(want) + delta) if valid else fdp.ConsumeIntInRange(0, 64)
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 0:
        out = Region(bytes(fill(size)))  # read-only
    elif kind == 1:
        out = Region(GUARDED_OUT.holding(fill(min(size, (MAX_VALUES + 2048) * 8)), at_end=fdp.ConsumeBool()))
    else:
        out = in_canaries(fdp, fill(size), misalign=kind == 2)
    valid_c = valid and is_contiguous_buffer(out.obj, True) and len(out.before or b"") == len(want)
    try:
        KERNEL.convert(buffer, count, dtype, out.obj)
    except Exception as exc:
        if not allowed(exc, buffer):
            raise
        if valid_c:
            raise Finding(f"convert refused a valid call: {type(exc).__name__}: {exc}") from exc
        if not out.unchanged():
            raise Finding("convert wrote into the out buffer of a call it refused") from exc
    else:
        if not valid_c:
            raise Finding(f"convert returned for an invalid call (count {count!r}, out {len(out.before or b'')})")
        if raw_bytes(out.obj) != want:
            raise Finding(f"convert wrote {raw_bytes(out.obj)!r}, expected {want!r}")
    if not out.canaries_intact():
        raise Finding("convert wrote outside the out buffer")
    if raw_bytes(buffer) != snapshot:
        raise Finding("convert wrote into the values buffer")


@instrument
def check_percentiles(
    got: Any, lut: bytes, wanted: list[int], snapshot: bytes, item: int, keys: tuple[list[int], list[int]],
    out: Region, collected: int, sub: Region,
) -> None:  # fmt: skip
    """The wanted values copied into ``out`` after ``collected`` (or -1), or counted into ``sub``."""
    if not lut:
        if got != collected or not out.unchanged() or not sub.unchanged():
            raise Finding(f"pass2 with no lut returned collected {got!r} (passed {collected}) or wrote out/sub")
        return
    before = out.before or b""
    if before:  # collect
        if not sub.unchanged():
            raise Finding("pass2 counted into sub while collecting into out")
        cap = len(before) // item
        want = -1 if collected == -1 or collected + len(wanted) > cap else collected + len(wanted)
        if got != want:
            raise Finding(
                f"pass2 collected {got!r}, expected {want} ({len(wanted)} wanted, {collected} of {cap} there)"
            )
        after = raw_bytes(out.obj) or b""
        if collected == -1 and after != before:
            raise Finding("pass2 wrote into out after an earlier overflow (collected -1)")
        kept = max(collected, 0) * item
        if after[:kept] != before[:kept]:
            raise Finding(f"pass2 overwrote the {collected} values already collected")
        if want >= 0:
            expected = b"".join(snapshot[i * item : (i + 1) * item] for i in wanted)
            if after[kept : want * item] != expected:
                raise Finding(f"pass2 collected values {after[kept : want * item]!r}, expected {expected!r}")
        return
    if got != collected:
        raise Finding(f"pass2 counting into sub returned collected {got!r}, passed {collected}")
    counts = array("q", sub.before or b"")
    tops, nexts = keys
    for i in wanted:
        counts[(lut[tops[i]] - 1) * KEY_BINS + nexts[i]] += 1
    if (raw_bytes(sub.obj) or b"") != counts.tobytes():
        now = array("q", raw_bytes(sub.obj) or b"")
        wrong = [(j, now[j], counts[j]) for j in range(len(counts)) if now[j] != counts[j]][:8]
        raise Finding(f"pass2 sub counts wrong at (index, got, expected) {wrong}")


def key_bin_values(keys: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The float32 value of each key bin (the top 16 bits of its key unfolded) and its count."""
    counts = np.frombuffer(keys, dtype=np.int64)
    key = np.arange(KEY_BINS, dtype=np.uint32)
    top = np.where(key & 0x8000, key ^ 0x8000, ~key & 0xFFFF).astype(np.uint32)
    return (top << np.uint32(16)).view(np.float32).astype(np.float64), counts


@instrument
def call_hist_of_keys(fdp: atheris.FuzzedDataProvider, dtype: Any, code: int | None) -> None:
    """One ``hist_of_keys`` call: key counts (any size, alignment, type; mostly zero, some bins
    counted or every bin at one base count), a histogram buffer as pass 2's, lo and scale natural or
    not. A return must add, for each finite key bin value, its count into that value's float64 bin."""
    keys = make_counts(fdp, KEY_BINS, GUARDED_KEYS)
    hist = make_counts(fdp, BINS, GUARDED_HIST)
    lo, scale = make_float(fdp, fdp.PickValueInList([-1.0, -0.05, 0.0, 3.0])), make_float(fdp, 64 / 2.0)
    flo, fscale = as_float(lo), as_float(scale)
    keys_ok = is_contiguous_buffer(keys.obj, False) and len(keys.before or b"") == KEY_BINS * 8
    keys_ok = keys_ok and aligned_for_int64(keys.obj)
    params_ok = flo is not None and fscale is not None and math.isfinite(flo) and math.isfinite(fscale) and fscale >= 0
    valid = code in SEEDABLE and keys_ok and hist.writable_counts(BINS) and params_ok
    try:
        KERNEL.hist_of_keys(keys.obj, dtype, lo, scale, hist.obj)
    except Exception as exc:
        if not allowed(exc, keys.obj):
            raise
        if valid:
            raise Finding(f"hist_of_keys refused a valid call: {type(exc).__name__}: {exc}") from exc
        if hist.obj is not keys.obj and not hist.unchanged():
            raise Finding("hist_of_keys wrote into the histogram of a call it refused") from exc
    else:
        if not valid:
            raise Finding(f"hist_of_keys returned for an invalid call (dtype {dtype!r})")
        assert flo is not None and fscale is not None and keys.before is not None and hist.before is not None
        values, counts = key_bin_values(keys.before)
        finite = np.isfinite(values) & (counts != 0)
        with np.errstate(all="ignore"):
            t = (values[finite] - flo) * fscale
        t = np.where(t > 0.0, t, 0.0)  # NaN: 0
        ids = np.where(t < BINS - 1.0, t, BINS - 1.0).astype(np.int64)
        want = array("q", hist.before).tolist()
        for i, c in zip(ids.tolist(), counts[finite].tolist(), strict=True):
            want[i] += c
        got = array("q", raw_bytes(hist.obj) or b"").tolist()
        if got != want:
            wrong = [(j, got[j], want[j]) for j in range(BINS) if got[j] != want[j]][:8]
            raise Finding(f"hist_of_keys histogram wrong at (bin, got, expected) {wrong}")
    for region, what in ((keys, "keys"), (hist, "histogram")):
        if not region.canaries_intact():
            raise Finding(f"hist_of_keys wrote outside the {what} buffer")
    if keys.obj is not hist.obj and not keys.unchanged():
        raise Finding("hist_of_keys wrote into the key counts")


@instrument
def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 5)  # 0, 1: pass 1; 2, 3: pass 2; 4: convert; 5: hist_of_keys
    dtype, code = make_dtype(fdp)
    if which == 5:
        call_hist_of_keys(fdp, dtype, code)
        return
    stored_as = code if code is not None else fdp.ConsumeIntInRange(0, 14)  # an unknown code: any values
    is_double = COMPUTES_DOUBLE[stored_as]
    item, citem = ITEMSIZE[stored_as], 8 if is_double else 4
    raw = make_values(fdp, stored_as)
    buffer = make_buffer(fdp, raw, item)
    count = make_count(fdp, len(raw_bytes(buffer) or b""), item)
    valid, stored = values_valid(buffer, count, item)
    valid = valid and code is not None
    # the values in the compute width, as the kernel must see them
    snapshot = _to_compute(stored_as, stored) if valid and stored is not None else None
    if which <= 1:
        call_pass1(fdp, buffer, count, dtype, snapshot, is_double, valid)
        return
    if which == 4:
        call_convert(fdp, buffer, count, dtype, snapshot, citem, valid)
        return
    vals = array("d" if is_double else "f", snapshot).tolist() if valid and snapshot is not None else []

    finite = [v for v in vals if math.isfinite(v)]
    lo0 = min(finite) if finite else 0.0
    hi0 = max(finite) if finite else 0.0
    natural_scale = min(BINS / (hi0 - lo0), 1e300) if hi0 > lo0 else 0.0
    dirty = fdp.ConsumeBool() if fdp.ConsumeIntInRange(0, 3) == 0 else len(finite) != len(vals)
    mean = make_float(fdp, sum(finite) / len(finite) if finite else 0.0)  # as the engine: may be inf
    lo = make_float(fdp, lo0)
    scale = make_float(fdp, natural_scale)
    hist = make_counts(fdp, BINS, GUARDED_HIST, buffer)

    tops, nexts, finite_bits = key_bins(snapshot or b"", is_double) if valid else ([], [], [])
    lut = make_lut(fdp, tops)
    lut_bytes = lut.before if is_contiguous_buffer(lut.obj, False) else None
    full_lut = lut_bytes is not None and len(lut_bytes) == KEY_BINS
    wanted = (
        [i for i, top in enumerate(tops) if lut_bytes[top] and (not dirty or finite_bits[i])]
        if full_lut and lut_bytes is not None
        else []
    )
    prefix = fdp.ConsumeIntInRange(0, 8)
    out = make_out(fdp, prefix, len(wanted), citem)
    out_len = len(out.before) if out.before is not None else 0
    collected = make_collected(fdp, prefix, out_len // citem)
    most = max(lut_bytes) if full_lut and lut_bytes is not None else fdp.ConsumeIntInRange(0, 1)
    sub = make_counts(fdp, min(most, SUB_MOST) * KEY_BINS, GUARDED_SUB)

    fmean, flo, fscale = as_float(mean), as_float(lo), as_float(scale)
    ncollected = as_ssize(collected)
    params_ok = (
        fmean is not None
        and flo is not None
        and fscale is not None
        and math.isfinite(flo)
        and math.isfinite(fscale)
        and fscale >= 0.0
    )
    parsed = (
        lut_bytes is not None
        and is_contiguous_buffer(out.obj, True)
        and is_contiguous_buffer(sub.obj, True)
        and ncollected is not None
    )
    if not parsed or ncollected is None or not lut_bytes:
        wanted_ok = parsed
    elif not full_lut or KEY_BINS - lut_bytes.count(0) > MAX_WANTED:
        wanted_ok = False
    elif out_len:
        wanted_ok = out_len % citem == 0 and -1 <= ncollected <= out_len // citem
    else:
        wanted_ok = sub.writable_counts(most * KEY_BINS)
    seeded = fdp.ConsumeIntInRange(0, 5) == 0  # the histogram already filled from the key bins
    valid2 = valid and hist.writable_counts(BINS) and params_ok and wanted_ok and (not seeded or code in SEEDABLE)
    written = (hist, out, sub)
    extra = (True,) if seeded else ()
    try:
        result = KERNEL.pass2(
            buffer, count, dtype, dirty, mean, lo, scale, hist.obj, lut.obj, out.obj, collected, sub.obj, *extra
        )
    except Exception as exc:
        if not allowed(exc, buffer, lut.obj):
            raise
        if valid2:
            raise Finding(f"pass2 refused a valid call: {type(exc).__name__}: {exc}") from exc
        for region, what in zip(written, ("histogram", "out", "sub"), strict=True):
            if region.obj is not buffer and not region.unchanged():
                raise Finding(f"pass2 wrote into the {what} buffer of a call it refused") from exc
    else:
        if not valid2:
            raise Finding(f"pass2 returned {result!r} for an invalid call (count {count!r})")
        assert fmean is not None and flo is not None and fscale is not None and hist.before is not None
        assert ncollected is not None and lut_bytes is not None and snapshot is not None
        shift, css, got = result
        want = check_pass2((shift, css), vals, is_double, dirty, fmean, flo, fscale)
        want = [0] * BINS if seeded else want  # a seeded pass counts nothing into the histogram
        after = array("q", raw_bytes(hist.obj) or b"").tolist()
        added = [a - b for a, b in zip(after, array("q", hist.before).tolist(), strict=True)]
        if any(c < 0 for c in added) or sum(added) != sum(want):  # (a seeded pass: all 0)
            raise Finding(f"pass2 added {sum(added)} counts (some negative: {min(added) < 0}), expected {sum(want)}")
        if added != want:
            raise Finding(f"pass2 histogram {added}, expected {want}")
        check_percentiles(got, lut_bytes, wanted, snapshot, citem, (tops, nexts), out, ncollected, sub)
    for region, what in zip((hist, lut, out, sub), ("histogram", "lut", "out", "sub"), strict=True):
        if not region.canaries_intact():
            raise Finding(f"pass2 wrote outside the {what} buffer")
    if not lut.unchanged():
        raise Finding("pass2 wrote into the lut")
    if hist.obj is not buffer and raw_bytes(buffer) != stored:
        raise Finding("pass2 wrote into the values buffer")


KERNEL = load_kernel()


def main() -> None:
    sys.stderr.write(f"fuzz_kernel: {getattr(KERNEL, '__file__', KERNEL)}\n")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
