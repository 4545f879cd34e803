"""The C kernel takes buffers, checks their lengths against the count before reading, and clamps
every float-to-int conversion: a wrong call raises, out-of-range values land in the end bins."""

from __future__ import annotations

import math
from array import array

import pytest

from ckptscope.stats.kernel_engine import load_kernel

kernel, why = load_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason=f"the C kernel is not built: {why}")


F32, F64 = 0, 1  # the DTYPES codes of float32 and float64 (0 and 1, as the engine's old bool)


def f32(*values: float) -> bytes:
    return array("f", values).tobytes()


def f64(*values: float) -> bytes:
    return array("d", values).tobytes()


def hist() -> array:
    return array("q", bytes(8 * 64))


def keys() -> array:
    return array("q", bytes(8 * 65536))


def pass2(values, count, dtype, dirty, mean, lo, scale, h, lut=b"", out=None, collected=0, sub=None):
    out = bytearray() if out is None else out
    sub = bytearray() if sub is None else sub
    return kernel.pass2(values, count, dtype, dirty, mean, lo, scale, h, lut, out, collected, sub)


@pytest.mark.parametrize(
    ("buffer", "count", "dtype"),
    [
        (f32(1, 2, 3), 4, "float32"),  # one value short: would read past the end
        (f32(1, 2, 3), 2, "float32"),  # longer than the count
        (f32(1, 2, 3), -1, "float32"),
        (f64(1, 2), 3, "float32"),  # 16 bytes are 4 float32, not 3
        (b"", 1, "float64"),
        (f32(1), 2**62, "float32"),  # count * itemsize overflows
        (bytes(3), 4, "int8"),  # 1-byte values: one short
        (bytes(7), 4, "bfloat16"),  # 2-byte values: an odd length
        (bytes(6), 4, "float16"),
        (bytes(24), 4, "int64"),  # 8-byte values: one short
        (bytes(16), 2**61, "uint64"),  # count * 8 wraps round
        (bytes(2), 2**62, "float16"),  # count * 2 overflows
    ],
)
def test_wrong_lengths_raise_before_reading(buffer, count, dtype):
    code = kernel.DTYPES[dtype]
    with pytest.raises(ValueError):
        kernel.pass1(buffer, count, code, keys())
    with pytest.raises(ValueError):
        kernel.pass1(buffer, count, code, bytearray())  # no keys: the same checks
    with pytest.raises(ValueError):
        pass2(buffer, count, code, False, 0.0, 0.0, 1.0, hist())


@pytest.mark.parametrize("code", [-1, 15, 2**31 - 1])
def test_unknown_dtype_codes_raise(code):
    with pytest.raises(ValueError):
        kernel.pass1(f32(1.0), 1, code, keys())
    with pytest.raises(ValueError):
        pass2(f32(1.0), 1, code, False, 0.0, 0.0, 1.0, hist())
    with pytest.raises(OverflowError):  # past a C int
        kernel.pass1(f32(1.0), 1, 2**31, keys())


def test_an_empty_key_buffer_counts_no_key_bins():
    values = f32(1, -2, 3, math.nan)
    assert kernel.pass1(values, 4, F32, bytearray()) == kernel.pass1(values, 4, F32, keys())
    with pytest.raises(TypeError):
        kernel.pass1(values, 4, F32, b"")  # still a writable buffer


def test_wrong_key_and_percentile_buffers_are_refused():
    values = f32(1, 2, 3)
    with pytest.raises(ValueError):
        kernel.pass1(values, 3, F32, array("q", bytes(8 * 65535)))
    with pytest.raises(TypeError):
        kernel.pass1(values, 3, F32, bytes(8 * 65536))  # read-only
    with pytest.raises(ValueError):  # a lut of the wrong size
        pass2(values, 3, F32, False, 2.0, 1.0, 32.0, hist(), lut=bytes(100), out=bytearray(64))
    lut = bytearray(65536)
    lut[0xBF80] = 2  # bin 2 wanted: the sub-bin counts must hold 2 * 65536
    with pytest.raises(ValueError):
        pass2(values, 3, F32, False, 2.0, 1.0, 32.0, hist(), lut=bytes(lut), sub=array("q", bytes(8 * 65536)))
    for collected in (-2, 100):  # a count outside the collection buffer
        with pytest.raises(ValueError):
            pass2(values, 3, F32, False, 2.0, 1.0, 32.0, hist(), lut=bytes(lut), out=bytearray(16), collected=collected)
    with pytest.raises(ValueError):  # not a whole number of values
        pass2(values, 3, F32, False, 2.0, 1.0, 32.0, hist(), lut=bytes(lut), out=bytearray(7))


@pytest.mark.parametrize("dirty", [False, True])
def test_a_collection_that_would_overflow_stops_at_its_end(dirty):
    """More values in the wanted bins than pass 1 counted (the file changed): nothing is written
    past the buffer, and the count says so."""
    values = f32(*([1.0] * 5000))
    lut = bytearray(65536)
    lut[0xBF80] = 1  # the key bin of 1.0
    whole = bytearray(4 * 11) + bytearray(b"\xaa" * 64)  # the collection buffer, then a guard
    out = memoryview(whole)[: 4 * 11]
    shift, css, collected = pass2(values, 5000, F32, dirty, 1.0, 1.0, 0.0, hist(), lut=bytes(lut), out=out)
    assert collected == -1 and whole[4 * 11 :] == bytearray(b"\xaa" * 64)
    out = bytearray(4 * 5001)
    *_, collected = pass2(values, 5000, F32, dirty, 1.0, 1.0, 0.0, hist(), lut=bytes(lut), out=out)
    assert collected == 5000 and array("f", bytes(out[: 4 * 5000])).tolist() == [1.0] * 5000


def test_addresses_and_bad_histograms_are_refused():
    values = f32(1, 2, 3)
    with pytest.raises(TypeError):
        kernel.pass1(id(values), 3, F32, keys())  # a bare address is not a buffer
    with pytest.raises(ValueError):
        pass2(values, 3, F32, False, 0.0, 0.0, 1.0, array("q", bytes(8 * 63)))
    with pytest.raises(TypeError):
        pass2(values, 3, F32, False, 0.0, 0.0, 1.0, bytes(8 * 64))  # read-only
    with pytest.raises(ValueError):  # int64 counts at an odd address
        pass2(values, 3, F32, False, 0.0, 0.0, 1.0, memoryview(bytearray(8 * 64 + 1))[1:])
    for scale, lo in ((-1.0, 0.0), (math.nan, 0.0), (math.inf, 0.0), (1.0, math.nan), (1.0, math.inf)):
        with pytest.raises(ValueError):
            pass2(values, 3, F32, False, 0.0, lo, scale, hist())


@pytest.mark.parametrize("is_double", [False, True])
@pytest.mark.parametrize("dirty", [False, True])
def test_values_outside_the_pass1_range_land_in_the_end_bins(is_double, dirty):
    """As when a file changes between pass 1 and pass 2: lo=0, hi=64, then values far outside."""
    values = [-3e9, -1e-3, 0.0, 10.5, 63.9, 64.0, 1e30, 3.0e38]
    pack = f64 if is_double else f32
    h = hist()
    pass2(pack(*values), len(values), F64 if is_double else F32, dirty, 32.0, 0.0, 1.0, h)
    counts = h.tolist()
    assert sum(counts) == len(values)
    assert counts[0] == 3 and counts[10] == 1 and counts[63] == 4, counts


def test_values_at_any_alignment_are_read(tmp_path):
    """File-mapped chunks start at any offset: values at an odd address are read exactly."""
    raw = bytearray(1) + f32(1.0, 2.0, 3.0, 4.0)
    finite, total, lo, hi, *_ = kernel.pass1(memoryview(raw)[1:], 4, F32, keys())
    assert (finite, total, lo, hi) == (4, 10.0, 1.0, 4.0)
    h = hist()
    pass2(memoryview(raw)[1:], 4, F32, False, 2.5, 1.0, 64 / 3, h)
    assert sum(h.tolist()) == 4 and h[0] == 1 and h[63] == 1


def test_nan_in_a_chunk_that_pass1_called_clean_does_not_escape_the_histogram():
    h = hist()
    values = f32(1.0, math.nan, 2.0, -math.inf, math.inf)
    pass2(values, 5, F32, False, 1.5, 1.0, 64.0, h)  # dirty=False: the fast loop sees them
    assert sum(h.tolist()) == 5 and all(c >= 0 for c in h.tolist())
