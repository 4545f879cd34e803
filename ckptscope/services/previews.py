"""Previews (a tensor as a PNG heatmap or line plot) and singular value spectra: the one
implementation behind the REST routes, the UI and the CLI.

The reading and reducing is ``insights.preview``, the drawing ``insights.png``, the SVD
``insights.spectrum``. Here: parsing the options, choosing the device, and the server's spectrum
cache (``<data_dir>/spectra/<content key>/<hash of the tensor's full name>.json``, written
atomically; a checkpoint's content never changes, so an entry stays right for as long as it
exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptscope.errors import Invalid
from ckptscope.formats import TensorInfo
from ckptscope.insights import png
from ckptscope.insights.preview import MAX_CELLS, REDUCES, Preview, PreviewPlan, plan_preview, reduce_tensor
from ckptscope.services.local_bytes import local_tensor

if TYPE_CHECKING:
    from ckptscope.core import Core
    from ckptscope.insights.spectrum import Spectrum
    from ckptscope.store.catalogue import Content

log = logging.getLogger(__name__)

MAX_INDEX = 64  # leading indices an ``index`` option may give (a tensor has at most 64 dimensions)
PREVIEW_VERSION = 1  # of the drawing: part of the PNG's ETag
_SVD_SLOTS = threading.BoundedSemaphore(1)  # one SVD at a time per process: requests queue, cores stay free
_PREVIEW_SLOTS = threading.BoundedSemaphore(2)  # tensors read for previews at once, per process


@dataclass(frozen=True, slots=True)
class RenderedPreview:
    png: bytes
    width: int
    height: int
    kind: str  # "heatmap" | "line"
    preview: Preview


def parse_index(text: str | None) -> tuple[int, ...]:
    """``"0,3"`` -> (0, 3); empty or None -> (); Invalid for anything else."""
    if text is None or not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_INDEX or not all(p.isdigit() and p.isascii() and len(p) <= 19 for p in parts):
        raise Invalid(f"index is up to {MAX_INDEX} comma-separated non-negative integers, e.g. 0,3", "bad_index")
    return tuple(int(p) for p in parts)


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCES:
        raise Invalid(f"reduce is one of {', '.join(REDUCES)} (got {reduce!r})", "bad_reduce")
    return reduce


def image_size(plan: PreviewPlan) -> tuple[int, int]:
    """(width, height) of the PNG a plan draws, known before any value is read."""
    if plan.kind == "line":
        return png.line_size()
    rows, cols = plan.grid
    return png.heatmap_size(rows, cols)


def preview_size(info: TensorInfo, index: tuple[int, ...] = ()) -> tuple[int, int]:
    return image_size(plan_preview(info, index))


def render_preview(info: TensorInfo, reduce: str = "mean", index: tuple[int, ...] = ()) -> RenderedPreview:
    """Read, reduce and draw one tensor (PreviewError, a 422, when it has no preview)."""
    with _PREVIEW_SLOTS:
        result = reduce_tensor(info, check_reduce(reduce), index)
    if result.plan.kind == "line":
        assert result.lo is not None and result.hi is not None
        data = png.line_png(result.values, result.lo, result.hi, result.plan.cols)
    else:
        data = png.heatmap_png(result.values, result.vmax)
    width, height = image_size(result.plan)
    return RenderedPreview(data, width, height, result.plan.kind, result)


def describe(plan: PreviewPlan, reduce: str = "mean") -> str:
    """One line saying what the image shows (its alt text)."""
    what = f"slice {list(plan.index)} ({' x '.join(map(str, plan.drawn))}) of " if plan.index else ""
    shape = " x ".join(map(str, plan.shape))
    if plan.kind == "line":
        block = -(-plan.cols // plan.grid[1])
        per = f", {block} values per point (mean and min..max)" if block > 1 else ""
        return f"line plot of {what}a {shape} tensor{per}"
    rows, cols = plan.grid
    how = "block mean" if reduce == "mean" else "block value of largest magnitude"
    return f"heatmap of {what}a {shape} tensor as {plan.rows} x {plan.cols}, {rows} x {cols} cells ({how})"


def stats_device(requested: str | None) -> str | None:
    """The torch device for spectra: the stats device when it resolves to CUDA, else None (CPU)."""
    if not requested:
        return None
    from ckptscope.stats.devices import resolve_device

    try:
        device = resolve_device(requested)
    except RuntimeError as exc:  # asked for CUDA that is not there (serve refuses to start then)
        log.warning("spectra on the CPU: %s", exc)
        return None
    return device if device is not None and device.startswith("cuda") else None


def spectrum_for(info: TensorInfo, device: str | None = None) -> Spectrum:
    """The tensor's spectrum, computed now (SpectrumError, a 422, when it has none or is too big)."""
    from ckptscope.insights.spectrum import spectrum_of  # imports torch

    with _SVD_SLOTS:
        return spectrum_of(info, device)


# --- the server: tensors of catalogued checkpoints ---------------------------------------------


def _tensor(core: Core, content: Content, root: str, name: str) -> TensorInfo:
    return core.queries.tensor_detail(content, root, name)[0]


def preview_etag(content: Content, root: str, name: str, reduce: str, index: tuple[int, ...]) -> str:
    key = json.dumps([PREVIEW_VERSION, MAX_CELLS, content.key, root, name, reduce, list(index)])
    return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'


def tensor_preview(
    core: Core, content: Content, root: str, name: str, reduce: str = "mean", index: tuple[int, ...] = ()
) -> RenderedPreview:
    with local_tensor(core, content.key, _tensor(core, content, root, name)) as info:
        return render_preview(info, reduce, index)


def tensor_preview_size(core: Core, content: Content, root: str, name: str) -> tuple[int, int] | None:
    """The default preview's size in pixels, or None when the tensor has none."""
    from ckptscope.insights.preview import PreviewError

    try:
        return preview_size(_tensor(core, content, root, name))
    except PreviewError:
        return None


def spectra_dir(core: Core) -> Path:
    return core.settings.data_dir / "spectra"


def forget_spectra(core: Core, content_key: str) -> None:
    """Remove a content's cached spectra (its last checkpoint is being deleted)."""
    shutil.rmtree(spectra_dir(core) / content_key, ignore_errors=True)


def _cache_path(core: Core, content: Content, full_name: str) -> Path:
    return spectra_dir(core) / content.key / (hashlib.sha256(full_name.encode()).hexdigest()[:32] + ".json")


def _read_cached(path: Path, full_name: str) -> dict[str, Any] | None:
    from ckptscope.insights.spectrum import VERSION

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != VERSION or data.get("name") != full_name:
        return None
    spectrum = data.get("spectrum")
    return spectrum if isinstance(spectrum, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".spectrum-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def tensor_spectrum(core: Core, content: Content, root: str, name: str) -> tuple[Spectrum, bool]:
    """The spectrum of a catalogued tensor, from the cache when it is there: (spectrum, cached)."""
    from ckptscope.insights.spectrum import VERSION, Spectrum

    info = _tensor(core, content, root, name)
    full = f"{root}.{info.name}" if root else info.name
    path = _cache_path(core, content, full)
    cached = _read_cached(path, full)
    if cached is not None:
        try:
            return Spectrum.from_json(cached), True
        except (KeyError, TypeError, ValueError, IndexError):
            pass  # a damaged entry: computed again
    with local_tensor(core, content.key, info) as local:
        spectrum = spectrum_for(local, stats_device(core.settings.stats_device))
    try:
        _write_atomically(path, json.dumps({"version": VERSION, "name": full, "spectrum": spectrum.to_json()}))
    except OSError as exc:  # a read-only or full data directory: the answer stands, uncached
        log.warning("spectrum of %r not cached: %s", full, exc)
    return spectrum, False


# --- the UI's views ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreviewView:
    """What the detail panel's preview shows (``web/templates/_preview.html``)."""

    reduce: str
    error: str | None = None  # why the tensor has no preview
    kind: str = "heatmap"
    width: int = 0
    height: int = 0
    alt: str = ""
    spectrum_error: str | None = None  # why it has no spectrum (None: the button is offered)


def preview_view(core: Core, content: Content, root: str, name: str, reduce: str = "mean") -> PreviewView:
    """The preview's description, from the listing alone (the image is read when it is fetched)."""
    from ckptscope.insights.preview import PreviewError
    from ckptscope.insights.spectrum import SpectrumError, check_size, matrix_shape

    reduce = check_reduce(reduce)
    info = _tensor(core, content, root, name)
    try:
        plan = plan_preview(info)
    except PreviewError as exc:
        return PreviewView(reduce, error=exc.detail)
    width, height = image_size(plan)
    spectrum_error = None
    try:
        check_size(*matrix_shape(info), stats_device(core.settings.stats_device) or "cpu")
    except SpectrumError as exc:
        spectrum_error = exc.detail
    return PreviewView(reduce, None, plan.kind, width, height, describe(plan, reduce), spectrum_error)


CHART_W, CHART_H, CHART_PAD = 240, 90, 4


@dataclass(frozen=True, slots=True)
class SpectrumView:
    spectrum: Spectrum | None
    error: str | None = None
    cached: bool = False
    points: str = ""  # an SVG polyline: log10(sigma) by rank, in a CHART_W x CHART_H box
    log_min: float = 0.0
    log_max: float = 0.0


def spectrum_points(spectrum: Spectrum) -> tuple[str, float, float]:
    """The spectrum as polyline points (x by rank, y by log10 sigma; zeros at the bottom), with the
    log10 range it spans."""
    import math

    values = [v for v in spectrum.values if v > 0]
    if not values:
        return "", 0.0, 0.0
    hi, lo = math.log10(max(values)), math.log10(min(values))
    span = hi - lo or 1.0
    last = max(spectrum.count - 1, 1)
    points = []
    for rank, value in zip(spectrum.ranks, spectrum.values, strict=True):
        x = CHART_PAD + rank / last * (CHART_W - 2 * CHART_PAD)
        level = (math.log10(value) - lo) / span if value > 0 else 0.0
        y = CHART_H - CHART_PAD - level * (CHART_H - 2 * CHART_PAD)
        points.append(f"{x:.1f},{y:.1f}")
    return " ".join(points), lo, hi


def spectrum_view(core: Core, content: Content, root: str, name: str) -> SpectrumView:
    from ckptscope.insights.spectrum import SpectrumError

    try:
        spectrum, cached = tensor_spectrum(core, content, root, name)
    except SpectrumError as exc:
        return SpectrumView(None, error=exc.detail)
    points, lo, hi = spectrum_points(spectrum)
    return SpectrumView(spectrum, None, cached, points, lo, hi)
