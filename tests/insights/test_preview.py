"""Previews: the PNG writer decoded by Pillow pixel by pixel, block reductions against torch on
every kind of source (plain, strided, bf16, integers, slices, GGUF blocks), bounded memory on a
256 MiB tensor, and the CLI."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ckptscope import cli
from ckptscope.formats import open_checkpoint
from ckptscope.insights import png
from ckptscope.insights.preview import PreviewError, plan_preview, reduce_tensor
from ckptscope.services.previews import describe, parse_index, render_preview
from tests import factories as f
from tests.helpers import ROOT


def decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def listed(path: Path, root: str | None = None) -> dict:
    ckpt = open_checkpoint(path)
    return {t.name: t for t in ckpt.root_tensors(ckpt.resolve_root(root))}


def reference_cells(x: torch.Tensor, bh: int, bw: int, how: str) -> np.ndarray:
    """Each bh x bw block of a 2-D tensor reduced by torch: the mean of its finite values, or the
    finite value of largest magnitude (torch.argmax of |x|); NaN for a block with no finite value.
    The matrix is padded with NaN to whole blocks and each block gathered into one row."""
    x = x.double()
    rows, cols = -(-x.shape[0] // bh), -(-x.shape[1] // bw)
    padded = torch.full((rows * bh, cols * bw), math.nan, dtype=torch.float64)
    padded[: x.shape[0], : x.shape[1]] = x
    blocks = padded.reshape(rows, bh, cols, bw).permute(0, 2, 1, 3).reshape(rows, cols, bh * bw)
    finite = torch.isfinite(blocks)
    if how == "mean":
        return torch.nanmean(torch.where(finite, blocks, math.nan), dim=-1).numpy()
    magnitude = torch.where(finite, blocks.abs(), -1.0)
    picked = blocks.gather(-1, magnitude.argmax(-1, keepdim=True))[..., 0]
    return torch.where(magnitude.amax(-1) < 0, math.nan, picked).numpy()


def test_reference_cells_is_the_obvious_loop():
    x = torch.tensor([[1.0, -5.0, 2.0], [math.nan, 4.0, math.inf], [math.nan, math.nan, 0.5]])
    np.testing.assert_array_equal(reference_cells(x, 2, 2, "mean"), [[0.0, 2.0], [math.nan, 0.5]])
    np.testing.assert_array_equal(reference_cells(x, 2, 2, "absmax"), [[-5.0, 2.0], [math.nan, 0.5]])


# --- the PNG writer and the rasters ------------------------------------------------------------


def test_encode_png_round_trips_every_pixel():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(decode(png.encode_png(rgb)), rgb)
    with pytest.raises(ValueError):
        png.encode_png(np.zeros((0, 4, 3), dtype=np.uint8))


def test_diverging_map_is_centred_on_zero_and_symmetric():
    colours = png.diverging(np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 5.0, math.nan]), 2.0)
    assert tuple(colours[0]) == png.BLUE and tuple(colours[2]) == png.WHITE and tuple(colours[4]) == png.RED
    assert tuple(colours[5]) == png.RED  # clipped
    assert tuple(colours[6]) == png.GREY
    # half way is half way to each end, on both sides
    white = np.array(png.WHITE)
    assert np.abs(colours[1] - (white + (np.array(png.BLUE) - white) / 2)).max() <= 1
    assert np.abs(colours[3] - (white + (np.array(png.RED) - white) / 2)).max() <= 1
    assert (png.diverging(np.zeros(3), 0.0) == 255).all()  # all zeros: white, no division by zero


def test_heatmap_pixels_colour_bar_and_labels():
    values = np.array([[-3.0, 0.0], [3.0, math.nan]])
    img = decode(png.heatmap_png(values))
    width, height = png.heatmap_size(2, 2)
    assert img.shape == (height, width, 3)
    scale = png.cell_scale(2, 2)
    assert scale == 64  # a 2x2 array is drawn 128 px a side
    m = png.MARGIN

    def cell(i: int, j: int) -> np.ndarray:
        block = img[m + i * scale : m + (i + 1) * scale, m + j * scale : m + (j + 1) * scale]
        assert (block == block[0, 0]).all()  # each cell is one flat colour
        return block[0, 0]

    assert tuple(cell(0, 0)) == png.BLUE and tuple(cell(0, 1)) == png.WHITE
    assert tuple(cell(1, 0)) == png.RED and tuple(cell(1, 1)) == png.GREY
    bar_x = m + 2 * scale + m
    bar_h = height - 2 * m
    bar = img[m : m + bar_h, bar_x : bar_x + png.BAR_WIDTH]
    assert (bar == bar[:, :1]).all()  # horizontal stripes
    top, middle, bottom = bar[0, 0], bar[bar_h // 2, 0], bar[-1, 0]
    assert top[0] > 170 and top[2] < 60  # red at +vmax
    assert bottom[2] > 160 and bottom[0] < 50  # blue at -vmax
    assert (middle >= 245).all()  # white at 0
    labels = img[:, bar_x + png.BAR_WIDTH :]
    assert (labels == 0).any(axis=2).any()  # black tick text drawn
    # the label strip holds exactly the glyphs of "3" (top), "0" (middle) and "-3" (bottom)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for y, text in ((m, "3"), (m + bar_h // 2 - 5, "0"), (m + bar_h - 10, "-3")):
        png.draw_text(canvas, bar_x + png.BAR_WIDTH + 4, y, text)
    assert np.array_equal(labels, canvas[:, bar_x + png.BAR_WIDTH :])


def test_font_draws_every_character_it_has():
    for ch in "0123456789-.e+":
        canvas = np.full((12, 10, 3), 255, dtype=np.uint8)
        png.draw_text(canvas, 1, 1, ch)
        assert (canvas == 0).any(), ch
    assert png.label(0.0) == "0" and png.label(-1.5e-7) == "-1.5e-07" and png.label(1234.0) == "1.23e+03"


def test_line_plot_axes_line_and_size():
    x = np.sin(np.linspace(0, 6, 300))
    img = decode(png.line_png(x, x - 0.1, x + 0.1, 300))
    assert img.shape[1::-1] == png.line_size()
    line = (img == np.array(png.LINE)).all(axis=2)
    envelope = (img == np.array(png.ENVELOPE)).all(axis=2)
    assert line.sum() > 300 and envelope.sum() > 300
    left = img.shape[1] - png.MARGIN - png.PLOT_W
    assert (img[png.MARGIN : png.MARGIN + png.PLOT_H, left - 2] == 0).all()  # the y axis
    # the line's highest pixel is near the top of the plot, its lowest near the bottom
    ys = np.nonzero(line.any(axis=1))[0]
    assert ys.min() < png.MARGIN + 25 and ys.max() > png.MARGIN + png.PLOT_H - 25


# --- block reductions --------------------------------------------------------------------------


@pytest.fixture
def tensors(tmp_path):
    f.seeded(0)
    w = torch.randn(1030, 700)
    w[3, 5] = math.nan
    w[10, 20] = math.inf
    w[0:3, 0:2] = math.nan  # one whole block without a finite value
    sd = {
        "w": w,
        "conv": torch.randn(8, 4, 3, 5),
        "v": torch.randn(5000),
        "small": torch.randn(7, 9),
        "i": torch.randint(-50, 50, (40, 30), dtype=torch.int32),
        "scalar": torch.tensor(1.0),
        "empty": torch.zeros(0, 4),
    }
    path = f.save_safetensors(sd, tmp_path / "t.safetensors")
    return sd, listed(path)


def test_block_mean_and_absmax_match_torch(tensors):
    sd, infos = tensors
    plan = plan_preview(infos["w"])
    assert plan.grid == (344, 350)  # blocks of 3 x 2
    for how in ("mean", "absmax"):
        got = reduce_tensor(infos["w"], how)
        want = reference_cells(sd["w"], 3, 2, how)
        assert got.values.shape == want.shape
        assert np.array_equal(np.isnan(got.values), np.isnan(want))
        assert np.isnan(got.values[0, 0])  # the all-NaN block
        np.testing.assert_allclose(got.values, want, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_small_tensors_are_drawn_cell_per_value(tensors):
    sd, infos = tensors
    got = reduce_tensor(infos["small"])
    np.testing.assert_array_equal(got.values, sd["small"].double().numpy())
    got = reduce_tensor(infos["i"], "absmax")
    np.testing.assert_array_equal(got.values, sd["i"].double().numpy())


def test_slices_and_the_default_reshape(tensors):
    sd, infos = tensors
    conv = sd["conv"]
    got = reduce_tensor(infos["conv"], index=(5, 3))
    assert got.plan.drawn == (3, 5) and got.plan.kind == "heatmap"
    np.testing.assert_array_equal(got.values, conv[5, 3].double().numpy())
    whole = reduce_tensor(infos["conv"])
    assert whole.plan.rows == 8 and whole.plan.cols == 4 * 3 * 5
    np.testing.assert_array_equal(whole.values, conv.reshape(8, -1).double().numpy())
    row = reduce_tensor(infos["conv"], index=(1, 2, 0))
    assert row.plan.kind == "line"
    np.testing.assert_array_equal(row.values, conv[1, 2, 0].double().numpy())
    three = reduce_tensor(infos["conv"], index=(7,))
    np.testing.assert_array_equal(three.values, conv[7].reshape(4, -1).double().numpy())


def test_line_keeps_mean_and_envelope(tensors):
    sd, infos = tensors
    got = reduce_tensor(infos["v"])
    v = sd["v"].double()
    blocks = -(-5000 // 1024)  # 5 values per point
    assert len(got.values) == 1000
    ref = v.reshape(1000, blocks)
    np.testing.assert_allclose(got.values, ref.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(got.lo, ref.amin(1).numpy())
    np.testing.assert_array_equal(got.hi, ref.amax(1).numpy())


def test_strided_bf16_and_torch_files(tmp_path):
    f.seeded(1)
    base = torch.randn(300, 260)
    sd = {"t": base.t(), "bf": base.bfloat16(), "h": base.half()[:, :100]}
    infos = listed(f.save_torch(sd, tmp_path / "s.pt"))
    assert infos["t"].stride == (1, 260) and infos["h"].stride == (260, 1)  # not row-major / not dense
    for name, bh, bw in (("t", 1, 1), ("bf", 1, 1), ("h", 1, 1)):
        got = reduce_tensor(infos[name])
        np.testing.assert_allclose(got.values, reference_cells(sd[name], bh, bw, "mean"), rtol=1e-6)
    sliced = reduce_tensor(infos["t"], index=(17,))
    np.testing.assert_array_equal(sliced.values, base.t()[17].double().numpy())


def test_gguf_quantized_blocks_are_decoded(tmp_path):
    from tests.formats.test_gguf import reference_values, write_gguf

    path = write_gguf(tmp_path / "q.gguf", [("blk.0.w", "Q8_0", (600, 64))])
    info = listed(path)["blk.0.w"]
    want = torch.from_numpy(reference_values(path)["blk.0.w"].astype(np.float64))
    got = reduce_tensor(info)
    np.testing.assert_allclose(got.values, reference_cells(want, 2, 1, "mean"), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "index", "fragment"),
    [
        ("scalar", (), "0-d"),
        ("empty", (), "empty"),
        ("conv", (8,), "out of range"),
        ("conv", (0, 0, 0, 0), "leaves nothing"),
    ],
)
def test_tensors_without_a_preview_say_why(tensors, name, index, fragment):
    _, infos = tensors
    with pytest.raises(PreviewError, match=fragment) as caught:
        reduce_tensor(infos[name], index=index)
    assert caught.value.status == 422


def test_complex_and_bad_options_are_refused(tmp_path, tensors):
    infos = listed(f.save_torch({"c": torch.randn(4, 4, dtype=torch.complex64)}, tmp_path / "c.pt"))
    with pytest.raises(PreviewError, match="complex64"):
        reduce_tensor(infos["c"])
    with pytest.raises(PreviewError, match="reduce"):
        reduce_tensor(tensors[1]["w"], "median")
    assert parse_index(" 0, 3 ") == (0, 3) and parse_index("") == ()
    for bad in ("-1", "a", "1,,2", "1.5", "١"):
        with pytest.raises(Exception, match="index"):
            parse_index(bad)


def test_render_preview_sizes_match_the_plan(tensors):
    _, infos = tensors
    image = render_preview(infos["conv"], index=(0, 1))
    assert decode(image.png).shape[1::-1] == (image.width, image.height)
    assert "slice [0, 1] (3 x 5)" in describe(image.preview.plan)
    line = render_preview(infos["v"])
    assert decode(line.png).shape[1::-1] == (line.width, line.height) == png.line_size()


# --- bounded memory and time -------------------------------------------------------------------

BIG = 8192


def write_big(path: Path) -> Path:
    """An 8192 x 8192 float32 safetensors file (256 MiB), written in row blocks."""
    header = json.dumps({"big": {"dtype": "F32", "shape": [BIG, BIG], "data_offsets": [0, BIG * BIG * 4]}}).encode()
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        for _ in range(0, BIG, 1024):
            fh.write(rng.standard_normal((1024, BIG), dtype=np.float32).tobytes())
    return path


def test_big_tensor_previews_in_bounded_memory(tmp_path):
    """A 256 MiB tensor in a fresh process: the peak RSS grows by far less than the tensor."""
    path = write_big(tmp_path / "big.safetensors")
    script = textwrap.dedent(
        f"""
        import json, resource, time
        from ckptscope.formats import open_checkpoint
        from ckptscope.services.previews import render_preview
        info = open_checkpoint({str(path)!r}).root_tensors("")[0]
        render_preview(open_checkpoint({str(path)!r}).root_tensors("")[0], "mean", (0,))  # imports, warm
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        out = {{}}
        for how in ("mean", "absmax"):
            image = render_preview(info, how)
            out[how] = image.preview.values.shape
        out["seconds"] = time.perf_counter() - start
        out["grew_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mean"] == out["absmax"] == [512, 512]
    assert out["grew_kib"] < 96 * 1024, out  # the tensor is 256 MiB
    assert out["seconds"] < 60, out


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_preview_writes_the_png(tensors, tmp_path, capsys):
    sd, infos = tensors
    path = infos["conv"].storage.path
    out = tmp_path / "conv.png"
    assert cli.main(["preview", path, "conv", "-o", str(out), "--index", "2,1", "--reduce", "absmax"]) == 0
    assert "wrote" in capsys.readouterr().out
    img = decode(out.read_bytes())
    cells = img[png.MARGIN : png.MARGIN + 3 * png.cell_scale(3, 5), png.MARGIN]
    assert len({tuple(c) for c in cells}) == 3  # three rows of cells in the first column
    assert cli.main(["preview", path, "scalar", "-o", str(tmp_path / "s.png")]) == 2
    assert "0-d" in capsys.readouterr().err and not (tmp_path / "s.png").exists()
    assert cli.main(["preview", path, "nope", "-o", str(tmp_path / "n.png")]) == 2
    assert "no tensor named 'nope'" in capsys.readouterr().err
