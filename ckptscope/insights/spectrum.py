"""The singular value spectrum of a weight matrix, with its stable rank and effective rank.

- The matrix: a 2-D tensor as it is; a higher rank as ``[shape[0], prod(shape[1:])]`` (a conv
  weight ``[out, in, kh, kw]`` as ``[out, in * kh * kw]``, the usual reading of a conv as a
  linear map). 1-D and 0-d tensors have no spectrum.
- ``torch.linalg.svdvals`` in float32 (float64 for a float64 tensor), on the CUDA device when the
  stats device (``CKPTSCOPE_STATS_DEVICE``) is one, else on the CPU.
- stable rank = ||A||_F^2 / sigma_max^2 = sum(sigma^2) / sigma_max^2, between 1 and rank(A);
  effective rank (Roy & Vetterli, 2007) = exp(H(p)) with p = sigma / sum(sigma) and H the Shannon
  entropy in nats, between 1 and rank(A). A zero matrix has both 0 (its rank).
- Bounded: the matrix is read whole (as float32/float64), so at most ``MAX_ELEMENTS`` elements;
  and the work, about rows * cols * min(rows, cols), at most ``MAX_WORK`` on the CPU (4096 x 4096
  takes about 10 s on 2 cores) or ``MAX_WORK_CUDA`` on a GPU. Larger matrices are refused (422)
  before anything is read.
- ``values`` in the JSON: all singular values when there are at most ``MAX_SHOWN``, otherwise
  ``MAX_SHOWN`` of them at evenly spaced ranks (``ranks`` says which; the first and the last are
  always kept); ``count`` is how many there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckptscope.errors import Invalid
from ckptscope.formats.model import TensorInfo

from .preview import preview_problem, value_chunks

MAX_ELEMENTS = 1 << 26  # 64 Mi elements: 256 MiB of float32 held while the SVD runs
MAX_WORK = 1 << 36  # rows * cols * min(rows, cols) on the CPU (4096^3: ~10 s on 2 cores)
MAX_WORK_CUDA = 1 << 42  # on a GPU (64x the CPU budget)
MAX_SHOWN = 512
VERSION = 1  # of the computation and its JSON (cached results of another version are recomputed)


class SpectrumError(Invalid):
    default_code = "no_spectrum"


@dataclass(frozen=True, slots=True)
class Spectrum:
    shape: tuple[int, int]  # the matrix's (rows, cols)
    dtype: str  # what the SVD ran in: float32 or float64
    device: str  # where it ran: "cpu" or a CUDA device
    count: int  # singular values: min(rows, cols)
    sigma_max: float
    stable_rank: float
    effective_rank: float
    values: list[float]  # descending; all of them, or MAX_SHOWN at ``ranks``
    ranks: list[int]  # 0-based ranks of ``values`` in the full spectrum

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "device": self.device,
            "count": self.count,
            "sigma_max": self.sigma_max,
            "stable_rank": self.stable_rank,
            "effective_rank": self.effective_rank,
            "values": self.values,
            "ranks": self.ranks,
            "sampled": len(self.values) < self.count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spectrum:
        return cls(
            shape=(int(data["shape"][0]), int(data["shape"][1])),
            dtype=str(data["dtype"]),
            device=str(data["device"]),
            count=int(data["count"]),
            sigma_max=float(data["sigma_max"]),
            stable_rank=float(data["stable_rank"]),
            effective_rank=float(data["effective_rank"]),
            values=[float(v) for v in data["values"]],
            ranks=[int(r) for r in data["ranks"]],
        )


def matrix_shape(info: TensorInfo) -> tuple[int, int]:
    """The (rows, cols) the tensor is read as; SpectrumError when it has no spectrum."""
    why = preview_problem(info)
    if why is not None:
        raise SpectrumError(why.replace("preview", "spectrum"))
    if len(info.shape) < 2:
        raise SpectrumError("a 1-d tensor has no singular value spectrum (it needs a matrix)")
    return info.shape[0], math.prod(info.shape[1:])


def check_size(rows: int, cols: int, device: str) -> None:
    """Refuse a matrix too big to decompose in bounded time and memory (see the module docstring)."""
    numel = rows * cols
    if numel > MAX_ELEMENTS:
        raise SpectrumError(
            f"a {rows} x {cols} matrix has {numel:,} elements; spectra are computed for at most "
            f"{MAX_ELEMENTS:,} (the whole matrix is held in memory)",
            "spectrum_too_large",
        )
    work, budget = rows * cols * min(rows, cols), MAX_WORK_CUDA if device.startswith("cuda") else MAX_WORK
    if work > budget:
        side = round(budget ** (1 / 3))
        raise SpectrumError(
            f"the SVD of a {rows} x {cols} matrix is too slow to compute on request on {device} "
            f"(at most the work of a {side} x {side} matrix)",
            "spectrum_too_large",
        )


def _sampled_ranks(count: int) -> list[int]:
    if count <= MAX_SHOWN:
        return list(range(count))
    return sorted({round(i * (count - 1) / (MAX_SHOWN - 1)) for i in range(MAX_SHOWN)})


def spectrum_of(info: TensorInfo, device: str | None = None) -> Spectrum:
    """The tensor's singular value spectrum; ``device`` a torch device (None: the CPU)."""
    where = device or "cpu"
    rows, cols = matrix_shape(info)
    check_size(rows, cols, where)
    compute = np.float64 if info.dtype == "float64" and info.quant is None else np.float32
    matrix = np.empty(rows * cols, dtype=compute)
    for pos, values in value_chunks(info, 0, rows * cols):
        matrix[pos : pos + values.size] = values
    if not bool(np.isfinite(matrix).all()):
        raise SpectrumError("the matrix has NaN or Inf values: its singular values are undefined", "nonfinite")
    with torch.inference_mode():
        a = torch.from_numpy(matrix).reshape(rows, cols).to(where)
        sigma = torch.linalg.svdvals(a).to("cpu", torch.float64).numpy()
    del a, matrix
    if not np.isfinite(sigma).all():
        raise SpectrumError(f"the singular values overflow {np.dtype(compute).name}", "nonfinite")
    return summarise(sigma, (rows, cols), np.dtype(compute).name, where)


def summarise(sigma: np.ndarray, shape: tuple[int, int], dtype: str, device: str) -> Spectrum:
    """Stable and effective rank of a spectrum (any order; shown descending)."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    top = float(s[0]) if s.size else 0.0
    total = float(s.sum())
    if top <= 0 or total <= 0:
        stable = effective = 0.0
    else:
        stable = float(np.sum((s / top) ** 2))
        p = s[s > 0] / total
        effective = float(math.exp(-np.sum(p * np.log(p))))
    ranks = _sampled_ranks(int(s.size))
    return Spectrum(
        shape=shape,
        dtype=dtype,
        device=device,
        count=int(s.size),
        sigma_max=top,
        stable_rank=stable,
        effective_rank=effective,
        values=[float(s[r]) for r in ranks],
        ranks=ranks,
    )
