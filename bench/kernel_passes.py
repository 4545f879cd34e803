"""Per-element cost of each kernel pass, this checkout's kernel beside a baseline's, in one process.

``python -m bench.kernel_passes OURS_SO BASELINE_SO`` prints JSON: nanoseconds per float32 element
(medians of alternating repetitions on one core) of

- ``baseline_pass1`` / ``baseline_pass2``: the baseline's sum/min/max pass and its centred-sums +
  64-bin histogram pass;
- ``pass1``: this kernel's first pass, which also counts every value into its 16-bit key bin;
- ``pass2``: the second pass without percentiles; ``pass2_wanted``: with the wanted-bin test and the
  copy of the hits, as the percentiles run it (nine percentiles' bins, from the same values).

The values are a 1 Mi-element N(0, 0.02) chunk (4 MiB: cache-resident on most machines, so these are
compute costs; page faults and memory traffic come on top in the whole-file figures).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from array import array
from types import ModuleType

import numpy as np

N = 1 << 20
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_kernel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wanted_lut(x: np.ndarray) -> bytearray:
    """The key bins holding the nine percentiles' order statistics, marked as pass 2 expects."""
    bits = x.view(np.uint32)
    keys = bits ^ ((x.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000))
    top = np.sort(keys >> 16)
    lut = bytearray(65536)
    for q in QUANTILES:
        lut[int(top[int(q * (len(top) - 1))])] = 1
    return lut


def costs(ours: ModuleType, baseline: ModuleType, reps: int = 41) -> dict[str, float]:
    x = (np.random.default_rng(0).standard_normal(N) * 0.02).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    scale = 64 / (hi - lo)
    keys = np.zeros(65536, np.int64)
    hist = array("q", bytes(8 * 64))
    lut, out = wanted_lut(x), bytearray(4 * (1 << 21))
    calls = {
        "baseline_pass1": lambda: baseline.pass1(x, N, False),
        "baseline_pass2": lambda: baseline.pass2(x, N, False, False, 0.0, lo, scale, hist),
        "pass1": lambda: ours.pass1(x, N, False, keys),
        "pass2": lambda: ours.pass2(x, N, False, False, 0.0, lo, scale, hist, b"", bytearray(), 0, bytearray()),
        "pass2_wanted": lambda: ours.pass2(x, N, False, False, 0.0, lo, scale, hist, lut, out, 0, bytearray()),
    }
    seen: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(reps):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seen[name].append((time.perf_counter() - started) / N * 1e9)
    return {name: round(statistics.median(v), 3) for name, v in seen.items()}


def main() -> int:
    print(json.dumps(costs(load(sys.argv[1]), load(sys.argv[2]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
