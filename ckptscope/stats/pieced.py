"""Statistics of a stitched tensor: a torch.distributed.checkpoint tensor saved as several chunks
(``TensorInfo.pieces``), each a plain tensor in its own file range.

The definitions are the other engines' exactly (``walk.py``): pass 1 walks every chunk of every
piece for the float64 sum, min/max, non-zero, NaN and Inf counts, which give the whole tensor's
provisional mean and range; pass 2 walks every piece again for the centred sums and the 64-bin
histogram over the whole tensor's [min, max]. Each piece's chunks are reduced by the C kernel
where the engine is the kernel, else by the torch-op engine's reductions (on its device).
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptscope.formats.model import TensorInfo

from . import kernel_engine
from .digest import tensor_digest
from .kernel_engine import load_kernel
from .model import HIST_BINS, TensorStats
from .walk import Accumulator, Buffers, Chunk, TensorWalker, ViewPlan, plan_view, unsupported_note

if TYPE_CHECKING:  # the torch-op engine's side, imported where it runs (never on the kernel's path)
    from .torch_engine import TorchGathering

MapFile = Callable[[str], mmap.mmap | None]


class _Piece:
    """One piece's walk and its own sums (combined with the others' by its expansion factor)."""

    def __init__(self, walker: TensorWalker, plan: ViewPlan) -> None:
        self.walker = walker
        self.plan = plan
        self.acc = Accumulator()
        self.dirty: list[bool] = []


def pieced_stats(
    info: TensorInfo,
    mapped: MapFile,
    bufs: Buffers | None = None,
    engine: str = "kernel",
    device: str | None = None,
    extras: bool = True,
) -> TensorStats:
    """Statistics of ``info`` (a TensorInfo with pieces). ``mapped`` gives a file's mapping (the
    engine's ``MappedFiles.get``); ``engine`` is the engine's name ("kernel", "torch-fallback",
    "torch") and ``device`` its torch device (None: the CPU). ``extras``: also the percentiles,
    the log-magnitude histogram and the digest."""
    note = unsupported_note(info)
    if note is not None:
        return TensorStats(numel=info.numel, note=note)
    if info.numel == 0:
        return TensorStats(numel=info.numel)
    kernel = load_kernel()[0] if engine == "kernel" else None
    bufs = bufs or Buffers()
    pieces: list[_Piece] = []
    for piece in info.pieces:
        mm = mapped(piece.info.storage.path)
        if mm is None or piece.info.numel == 0:
            continue
        plan = plan_view(piece.info)
        pieces.append(_Piece(TensorWalker(mm, piece.info, plan, bufs, hashing=False), plan))
    for p in pieces:  # pass 1: every piece, before any piece's pass 2
        for chunk in p.walker.chunks():
            p.dirty.append(_pass1(kernel, p.acc, chunk, device))
    whole = Accumulator()
    zeros = 0
    for p in pieces:
        f = p.plan.factor
        zeros += (p.plan.count - p.acc.nonzero) * f
        whole.nan += p.acc.nan * f
        whole.inf += p.acc.inf * f
        whole.keys += p.acc.keys * f
        whole.is_double = p.acc.is_double
        if p.acc.n:
            whole.n += p.acc.n * f
            whole.total += p.acc.total * f
            whole.lo = min(whole.lo, p.acc.lo)
            whole.hi = max(whole.hi, p.acc.hi)
    whole.nonzero = info.numel - zeros
    mean = whole.total / whole.n if whole.n else 0.0
    if whole.n:
        # the percentiles of the whole tensor: its key bins are every piece's (counted once per
        # logical element), gathered from every piece in pass 2
        exact = all(p.walker.values_exact_in_key_bins for p in pieces)
        rank_plan = whole.plan_percentiles(info.numel, 1, exact) if extras else None
        gathering = kernel_engine.Gathering(rank_plan, bufs) if kernel is not None else None
        torch_gathering = None
        if kernel is None:
            from .torch_engine import TorchGathering

            torch_gathering = TorchGathering(rank_plan, device or "cpu")
        for p in pieces:  # binned over the whole tensor's range: every piece alike
            if p.acc.n:
                shift, css, hist = _pass2(kernel, p, mean, whole, device, gathering, torch_gathering)
                f = p.plan.factor
                whole.shift += shift * f
                whole.css += css * f
                whole.hist = [a + b * f for a, b in zip(whole.hist, hist, strict=True)]
        whole.percentiles = (gathering or torch_gathering).percentiles()  # type: ignore[union-attr]
    for p in pieces:
        p.walker.release()
    whole.digest = tensor_digest(info) if extras else None  # the stitched tensor's bytes in C order
    return whole.result(info.numel, info.numel, 1, mean)


def _pass1(kernel: kernel_engine.Kernel | None, acc: Accumulator, chunk: Chunk, device: str | None) -> bool:
    if kernel is not None:
        return kernel_engine._pass1(kernel, acc, chunk)
    from . import torch_engine

    values = torch_engine.chunk_values(chunk)
    return torch_engine._pass1(acc, values if device in (None, "cpu") else values.to(device))


def _pass2(
    kernel: kernel_engine.Kernel | None,
    p: _Piece,
    mean: float,
    whole: Accumulator,
    device: str | None,
    gathering: kernel_engine.Gathering | None,
    torch_gathering: TorchGathering | None,
) -> tuple[float, float, list[int]]:
    """One piece's sum of (x - mean), of (x - mean)^2, and histogram over ``whole``'s range; its
    values for the whole tensor's percentiles go to the gathering. A piece repeated by an
    expansion factor (a stride-0 view) is gathered once per repetition."""
    chunks = zip(p.walker.chunks(), p.dirty, strict=True)
    if kernel is not None:  # the kernel engine's own pass 2, binning over the whole range
        assert gathering is not None
        acc = Accumulator()
        acc.lo, acc.hi = whole.lo, whole.hi
        acc.keys = p.acc.keys  # this piece's key bins, binned over the whole range
        counts, from_keys = kernel_engine.new_histogram(kernel, acc, p.walker, True, p.plan.count)
        for chunk, dirty in chunks:
            kernel_engine._pass2(kernel, acc, chunk, dirty, mean, counts, gathering, from_keys)
            for _ in range(p.plan.factor - 1):  # the repetitions' values, for the percentiles only
                kernel_engine._pass2(
                    kernel, Accumulator(), chunk, dirty, mean, array("q", bytes(8 * HIST_BINS)), gathering
                )
        return acc.shift, acc.css, counts.tolist()
    import torch

    from . import torch_engine

    lo, scale, where = whole.lo, whole.hist_scale(), device or "cpu"
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=where)
    sums = torch.zeros(2, dtype=torch.float64, device=where)
    assert torch_gathering is not None
    for chunk, dirty in chunks:
        values = torch_engine.chunk_values(chunk).to(where)
        finite = values[torch.isfinite(values)] if dirty else values
        torch_engine._pass2(finite, mean, lo, scale, hist, sums)
        for _ in range(p.plan.factor):
            torch_gathering.add(finite)
    shift, css = sums.tolist()
    return float(shift), float(css), [int(v) for v in hist.cpu().tolist()]
