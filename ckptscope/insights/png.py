"""A small PNG writer and the two rasters the previews draw: a heatmap with a colour bar, and a
line plot. numpy, zlib and struct only (no Pillow at runtime).

- ``encode_png``: 8-bit RGB, no interlace, filter 0 on every row, one zlib stream.
- ``diverging``: a blue-white-red map centred on zero and symmetric (``-vmax`` is ``BLUE``, 0 is
  ``WHITE``, ``+vmax`` is ``RED``, linear in between); NaN is ``GREY``.
- Text (tick labels) in a built-in 3x5 bitmap font of the characters ``0-9 - . e +``, scaled.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

WHITE = (255, 255, 255)
BLUE = (33, 102, 172)  # -vmax
RED = (178, 24, 43)  # +vmax
GREY = (150, 150, 150)  # NaN / no finite value in the block
BLACK = (0, 0, 0)
LINE = (33, 102, 172)  # the line plot's mean line
ENVELOPE = (171, 199, 226)  # the line plot's min/max envelope

FONT_SCALE = 2  # each font pixel is this many image pixels
_GLYPH_W, _GLYPH_H = 3, 5
_GLYPHS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"),
    "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"),
    "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"),
    "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."),
    ".": ("...", "...", "...", "...", ".#."),
    "e": ("...", "###", "#.#", "##.", "###"),
    " ": ("...", "...", "...", "...", "..."),
}
_GLYPH_BITS = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _GLYPHS.items()}

MAX_SIDE = 512  # a heatmap is at most this many cells a side (and drawn at most this many pixels)
MIN_DRAWN = 128  # small heatmaps are scaled up (whole pixels per cell) to at least about this size
BAR_WIDTH = 16
MARGIN = 8
PLOT_W, PLOT_H = 512, 200  # the line plot's drawing area


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError("encode_png takes an (H, W, 3) uint8 array")
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("a PNG has at least one pixel")
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def diverging(values: np.ndarray, vmax: float) -> np.ndarray:
    """Colours of ``values`` (any shape) on the blue-white-red map over [-vmax, vmax]: an array of
    the same shape plus a last axis of 3 uint8. NaN is grey; values beyond +-vmax clip; a vmax of
    0 (all values zero) shows white."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    t = np.zeros_like(v) if vmax <= 0 or not math.isfinite(vmax) else np.clip(np.nan_to_num(v) / vmax, -1.0, 1.0)
    white = np.array(WHITE, dtype=np.float64)
    toward = np.where((t < 0)[..., None], np.array(BLUE, dtype=np.float64), np.array(RED, dtype=np.float64))
    rgb = white + np.abs(t)[..., None] * (toward - white)
    out = np.rint(rgb).astype(np.uint8)
    out[nan] = GREY
    return out


def label(value: float) -> str:
    """A tick label in the font's characters: 3 significant digits."""
    if value == 0:
        return "0"
    return f"{value:.3g}"


def text_size(text: str, scale: int = FONT_SCALE) -> tuple[int, int]:
    return (len(text) * (_GLYPH_W + 1) - 1) * scale if text else 0, _GLYPH_H * scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, color: tuple[int, int, int] = BLACK) -> None:
    """Draw ``text`` with its top-left corner at (x, y), clipped to the image; characters outside
    the font are drawn as blanks."""
    scale = FONT_SCALE
    for i, ch in enumerate(text):
        bits = _GLYPH_BITS.get(ch, _GLYPH_BITS[" "])
        big = np.kron(bits, np.ones((scale, scale), dtype=bool))
        gx = x + i * (_GLYPH_W + 1) * scale
        y0, x0 = max(y, 0), max(gx, 0)
        y1, x1 = min(y + big.shape[0], img.shape[0]), min(gx + big.shape[1], img.shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        img[y0:y1, x0:x1][big[y0 - y : y1 - y, x0 - gx : x1 - gx]] = color


def cell_scale(rows: int, cols: int) -> int:
    """Whole pixels per heatmap cell: small heatmaps (a 3x3 kernel) are scaled up to at least about
    MIN_DRAWN pixels a side, never past MAX_SIDE."""
    side = max(rows, cols, 1)
    return max(1, min(MIN_DRAWN // side, MAX_SIDE // side)) if side < MIN_DRAWN else 1


_LABEL_W = text_size("-8.88e-888")[0]  # the widest label ``label`` makes: sizes never depend on the values
_BAR_MIN_H = 100


def heatmap_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of ``heatmap_png`` for a rows x cols array."""
    scale = cell_scale(rows, cols)
    height = max(rows * scale, _BAR_MIN_H) + 2 * MARGIN
    width = MARGIN + cols * scale + MARGIN + BAR_WIDTH + 4 + _LABEL_W + MARGIN
    return width, height


def _bar_labels(vmax: float) -> list[str]:
    return [label(vmax), "0", label(-vmax)]


def heatmap_png(values: np.ndarray, vmax: float | None = None) -> bytes:
    """A 2-D array as a heatmap PNG: the cells (scaled up by ``cell_scale``) on the diverging map
    over [-vmax, vmax] (default: the largest finite |value|), a colour bar to the right with its
    top (+vmax), centre (0) and bottom (-vmax) labelled."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError("heatmap_png takes a non-empty 2-D array")
    rows, cols = v.shape
    if vmax is None:
        finite = v[np.isfinite(v)]
        vmax = float(np.abs(finite).max()) if finite.size else 0.0
    scale = cell_scale(rows, cols)
    width, height = heatmap_size(rows, cols)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    cells = diverging(v, vmax)
    if scale > 1:
        cells = cells.repeat(scale, axis=0).repeat(scale, axis=1)
    img[MARGIN : MARGIN + rows * scale, MARGIN : MARGIN + cols * scale] = cells
    # the colour bar: +vmax at the top, -vmax at the bottom, 0 in the middle
    bar_h = height - 2 * MARGIN
    bar_x = MARGIN + cols * scale + MARGIN
    levels = vmax * (1 - 2 * (np.arange(bar_h) + 0.5) / bar_h) if bar_h > 1 else np.zeros(bar_h)
    img[MARGIN : MARGIN + bar_h, bar_x : bar_x + BAR_WIDTH] = diverging(levels, vmax)[:, None, :]
    text_x = bar_x + BAR_WIDTH + 4
    _, th = text_size("0")
    top, mid, bottom = _bar_labels(vmax)
    draw_text(img, text_x, MARGIN, top)
    draw_text(img, text_x, MARGIN + bar_h // 2 - th // 2, mid)
    draw_text(img, text_x, MARGIN + bar_h - th, bottom)
    return encode_png(img)


def _line(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    xs = np.rint(np.linspace(x0, x1, steps + 1)).astype(np.int64)
    ys = np.rint(np.linspace(y0, y1, steps + 1)).astype(np.int64)
    ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[ok], xs[ok]] = color


def line_size() -> tuple[int, int]:
    """(width, height) in pixels of ``line_png``."""
    _, th = text_size("0")
    return MARGIN + _LABEL_W + 4 + PLOT_W + MARGIN, MARGIN + PLOT_H + 4 + th + MARGIN


def line_png(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: int) -> bytes:
    """A line plot of ``count`` values summarised at len(mean) points (each point: a block's mean
    and its min..max envelope; for at most PLOT_W points they are the values themselves). Axes on
    the left and bottom, the y range's min and max labelled on the left, 0 and ``count - 1`` below.
    Points with no finite value are gaps."""
    mean, lo, hi = (np.asarray(a, dtype=np.float64) for a in (mean, lo, hi))
    points = len(mean)
    if points == 0:
        raise ValueError("line_png takes at least one point")
    finite = np.isfinite(lo) & np.isfinite(hi)
    ymin = float(lo[finite].min()) if finite.any() else 0.0
    ymax = float(hi[finite].max()) if finite.any() else 0.0
    width, height = line_size()
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left = width - MARGIN - PLOT_W
    top = MARGIN
    span = ymax - ymin

    def y_of(v: float) -> int:
        if span <= 0:
            return top + PLOT_H // 2
        return top + round((ymax - v) / span * (PLOT_H - 1))

    def x_of(i: int) -> int:
        return left + (round(i * (PLOT_W - 1) / (points - 1)) if points > 1 else PLOT_W // 2)

    for i in range(points):  # the envelope first, the mean line over it
        if finite[i] and hi[i] > lo[i]:
            _line(img, x_of(i), y_of(float(lo[i])), x_of(i), y_of(float(hi[i])), ENVELOPE)
    prev: tuple[int, int] | None = None
    for i in range(points):
        if not math.isfinite(mean[i]):
            prev = None
            continue
        here = (x_of(i), y_of(float(mean[i])))
        if prev is None:
            img[here[1], here[0]] = LINE
        else:
            _line(img, *prev, *here, LINE)
        prev = here
    # axes: y on the left, x at the bottom
    img[top : top + PLOT_H, left - 2] = BLACK
    img[top + PLOT_H + 1, left - 2 : left + PLOT_W] = BLACK
    tw_max, th = text_size(label(ymax))
    tw_min, _ = text_size(label(ymin))
    draw_text(img, left - 4 - tw_max, top, label(ymax))
    draw_text(img, left - 4 - tw_min, top + PLOT_H - th, label(ymin))
    end = str(max(count - 1, 0))
    draw_text(img, left, top + PLOT_H + 4, "0")
    draw_text(img, left + PLOT_W - text_size(end)[0], top + PLOT_H + 4, end)
    return encode_png(img)
