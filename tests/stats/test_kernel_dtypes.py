"""The C kernel reads every stored dtype itself: its conversion is torch's, bit for bit, and its
passes over a chunk of any dtype give exactly what the float passes give over torch's conversion
of that chunk (sums, min/max, counts, key bins, histogram, collected values, sub-bin counts)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from ckptscope.stats.kernel_engine import load_kernel

kernel, why = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"the C kernel is not built: {why}")

FLOATS32 = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
INTEGERS = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64, torch.uint64]
ALL = [*FLOATS32, torch.float64, *INTEGERS, torch.bool]
LENGTHS = [0, 1, 15, 16, 17, 2047, 2048, 2049, 4096 + 33]
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


def code(dtype: torch.dtype) -> int:
    return kernel.DTYPES[str(dtype).removeprefix("torch.")]


def compute(dtype: torch.dtype) -> torch.dtype:
    """The width the kernel computes in: float32 for float32, float16, bfloat16 and float8."""
    return torch.float32 if dtype in FLOATS32 else torch.float64


def stored(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def at_odd_address(data: bytes) -> memoryview:
    return memoryview(bytearray(1) + data)[1:]


def bits(t: torch.Tensor) -> np.ndarray:
    """The bits of float32/float64 values, to compare NaN payloads and signed zeros too."""
    return t.numpy().view(np.uint32 if t.dtype == torch.float32 else np.uint64)


def converted(data: bytes | memoryview, count: int, dtype: torch.dtype, odd_out: bool = False) -> torch.Tensor:
    width = compute(dtype)
    size = 4 if width == torch.float32 else 8
    whole = bytearray(count * size + 1)
    out = memoryview(whole)[1:] if odd_out else memoryview(whole)[: count * size]
    kernel.convert(data, count, code(dtype), out)
    return torch.frombuffer(bytearray(out), dtype=width) if count else torch.empty(0, dtype=width)


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    if dtype.itemsize == 2:
        return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)


def extremes(dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    values = sorted({info.min, info.min + 1, -1 if info.min < 0 else 2, 0, 1, info.max // 3, info.max - 1, info.max})
    if dtype == torch.uint64:  # torch makes no uint64 tensor from Python ints beyond int64
        return torch.from_numpy(np.array(values, dtype=np.uint64).view(np.int64)).view(torch.uint64)
    return torch.tensor(values, dtype=dtype)


def test_the_codes_are_the_documented_ones():
    assert kernel.DTYPES["float32"] == 0 and kernel.DTYPES["float64"] == 1
    assert sorted(kernel.DTYPES) == sorted(str(d).removeprefix("torch.") for d in ALL)
    assert sorted(kernel.DTYPES.values()) == list(range(len(ALL)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_bit_pattern_converts_as_torch_converts_it(dtype):
    """All 65536 (or 256) patterns, NaNs with their sign and payload included, in one call (the
    vectorised loop: F16C for float16 where the CPU has it) and in calls of 15 values (fewer than
    the loops' 16 lanes: the portable conversion)."""
    t = every_pattern(dtype)
    want = bits(t.to(torch.float32))
    assert (bits(converted(stored(t), t.numel(), dtype)) == want).all()
    raw = stored(t)
    item = dtype.itemsize
    pieces = [
        converted(raw[i * item : (i + 15) * item], min(15, t.numel() - i), dtype) for i in range(0, t.numel(), 15)
    ]
    assert (bits(torch.cat(pieces)) == want).all()


@pytest.mark.parametrize("dtype", INTEGERS)
def test_integers_at_their_extremes_convert_as_torch_rounds_them(dtype):
    t = extremes(dtype).repeat(5)  # 40 values: the lanes and the tail
    want = bits(t.to(torch.float64))
    for odd_out in (False, True):
        assert (bits(converted(at_odd_address(stored(t)), t.numel(), dtype, odd_out)) == want).all()


def test_bools_read_as_zero_and_one():
    t = torch.tensor([False, True] * 20)
    assert converted(stored(t), 40, torch.bool).tolist() == [0.0, 1.0] * 20
    # a byte other than 0 or 1 is no bool torch writes; the kernel reads any non-zero byte as 1
    assert converted(bytes([0, 2, 255]), 3, torch.bool).tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, torch.int64])
def test_convert_checks_every_length_and_code(dtype):
    raw, n = stored(torch.zeros(5, dtype=dtype)), 5
    size = 4 if compute(dtype) == torch.float32 else 8
    for count in (4, 6, -1, 2**62):
        with pytest.raises(ValueError):
            kernel.convert(raw, count, code(dtype), bytearray(max(count, 0) % 64 * size))
    for out in (bytearray(n * size - 1), bytearray(n * size + 1)):
        with pytest.raises(ValueError):
            kernel.convert(raw, n, code(dtype), out)
    with pytest.raises(TypeError):
        kernel.convert(raw, n, code(dtype), bytes(n * size))  # read-only
    for bad in (-1, len(ALL), 1000):
        with pytest.raises(ValueError):
            kernel.convert(raw, n, bad, bytearray(n * size))


@pytest.mark.parametrize("call", ["pass1", "pass2"])
def test_the_passes_refuse_unknown_codes_and_lengths_of_other_item_sizes(call):
    def run(data, count, dtype_code):
        if call == "pass1":
            return kernel.pass1(data, count, dtype_code, bytearray(8 * 65536))
        return kernel.pass2(
            data, count, dtype_code, False, 0.0, 0.0, 1.0, bytearray(8 * 64), b"", bytearray(), 0, bytearray()
        )

    for bad in (-1, len(ALL)):
        with pytest.raises(ValueError):
            run(bytes(8), 1, bad)
    for dtype, data, count in (
        (torch.int8, bytes(3), 4),
        (torch.bfloat16, bytes(6), 4),  # 6 bytes: 3 bfloat16
        (torch.float16, bytes(7), 3),
        (torch.int64, bytes(16), 3),
        (torch.uint8, bytes(1), 2**62),
    ):
        with pytest.raises(ValueError):
            run(data, count, code(dtype))
        run(data[: dtype.itemsize * (len(data) // dtype.itemsize)], len(data) // dtype.itemsize, code(dtype))


def sample(dtype: torch.dtype, n: int, dirty: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
        if n:
            x[0] = 0.0
        if dirty and n >= 3:
            x[1], x[n // 2], x[-1] = math.nan, math.inf, -math.inf
        return x.to(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) < 0.3
    if dtype == torch.uint64:
        return torch.randint(-(2**62), 2**62, (n,), generator=g, dtype=torch.int64).view(torch.uint64)
    info = torch.iinfo(dtype)
    x = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
    ends = extremes(dtype)[:n]
    x[: len(ends)] = ends
    return x


def wanted(keys: np.ndarray) -> bytearray:
    """The nine percentiles' key bins, marked as the engine marks them."""
    lut = bytearray(65536)
    ends = np.cumsum(keys)
    if ends[-1] == 0:
        return lut
    for q in QUANTILES:
        b = int(np.searchsorted(ends, int(q * (ends[-1] - 1)), side="right"))
        lut[b] = max(lut) + 1 if not lut[b] else lut[b]
    return lut


def both_passes(data, n: int, dtype_code: int, itemsize: int) -> dict:
    """Everything the two passes give for one chunk, the values collected and counted by sub-bin."""
    keys = np.zeros(65536, np.int64)
    first = kernel.pass1(data, n, dtype_code, keys)
    assert kernel.pass1(data, n, dtype_code, bytearray()) == first  # no keys: the same moments
    finite, total, lo, hi, _, nan, inf = first
    dirty = bool(nan or inf)
    mean = total / finite if finite else 0.0
    scale = 64 / (hi - lo) if finite and hi > lo else 0.0
    lo = lo if finite else 0.0
    lut = wanted(keys)
    hist = np.zeros(64, np.int64)
    plain = kernel.pass2(data, n, dtype_code, dirty, mean, lo, scale, hist, b"", bytearray(), 0, bytearray())
    room = int(keys[np.frombuffer(bytes(lut), np.uint8) > 0].sum()) + 1
    out = bytearray(room * itemsize + 1)
    collecting = memoryview(out)[1:]  # collected at an odd address
    shift, css, got = kernel.pass2(
        data, n, dtype_code, dirty, mean, lo, scale, hist, bytes(lut), collecting, 0, bytearray()
    )
    sub = np.zeros(max(lut) * 65536, np.int64)
    counted = kernel.pass2(data, n, dtype_code, dirty, mean, lo, scale, hist, bytes(lut), bytearray(), 0, sub)
    return {
        "pass1": struct.pack("<qdddqqq", *first),
        "keys": keys.tobytes(),
        "pass2": struct.pack("<ddq", *plain) + struct.pack("<ddq", shift, css, got) + struct.pack("<ddq", *counted),
        "hist": hist.tobytes(),
        "collected": bytes(collecting[: max(got, 0) * itemsize]),
        "sub": sub.tobytes(),
    }


@pytest.mark.parametrize(
    ("dtype", "dirty"),
    [(d, False) for d in ALL] + [(d, True) for d in ALL if d.is_floating_point],
    ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else ("nan-inf" if v else "clean"),
)
def test_the_passes_over_stored_values_equal_the_float_passes_over_torch_conversion(dtype, dirty):
    width = compute(dtype)
    itemsize = 4 if width == torch.float32 else 8
    for seed, n in enumerate(LENGTHS):
        t = sample(dtype, n, dirty, seed)
        ours = both_passes(at_odd_address(stored(t)), n, code(dtype), itemsize)
        theirs = both_passes(stored(t.to(width)), n, code(width), itemsize)
        for part in ours:
            assert ours[part] == theirs[part], (dtype, n, part)
        if n >= 3 and dirty:  # the NaN and Inf put in were seen (whatever float8 made of them)
            wide = t.to(width)
            seen = (int(wide.isnan().sum()), int(wide.isinf().sum()))
            assert struct.unpack("<qdddqqq", ours["pass1"])[5:] == seen and sum(seen) >= 1
