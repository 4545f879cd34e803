"""Stats of checkpoints whose bytes come through a RangeReader (copied range by range, as from an
object store) equal the local engine's on the same files, reading each byte range once."""

from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from ckptscope.errors import SourceChanged
from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import Piece, TensorInfo
from ckptscope.stats.engine import StatsCancelled, compute_stats
from ckptscope.stats.spool import (
    MERGE_GAP,
    LocalFileReader,
    compute_stats_ranged,
    plan_range_tasks,
    task_stats,
    tensor_spans,
)
from tests.formats.test_gguf import write_gguf
from tests.stats.test_percentiles import stitched_dcp

URL = "s3://bucket"


def as_urls(info: TensorInfo) -> TensorInfo:
    """The tensor as an object store lists it: every path a URL, no local file by that name."""
    moved = info._replace(
        storage=info.storage._replace(path=URL + info.storage.path),
        pieces=tuple(Piece(p.offsets, as_urls(p.info)) for p in info.pieces),
    )
    if info.quant is not None:
        scales, zero_points = info.quant.scales, info.quant.zero_points
        moved = moved._replace(
            quant=info.quant._replace(
                scales=None if scales is None else as_urls(scales),
                zero_points=None if zero_points is None else as_urls(zero_points),
            )
        )
    return moved


class CopyingReader:
    """A store with no local files: every range is copied from the real file, and counted. Paths
    may be URLs made by ``as_urls``."""

    def __init__(self, fail_on_call: int | None = None, short: bool = False) -> None:
        self.reads: list[tuple[str, int, int]] = []
        self.fail_on_call = fail_on_call
        self.short = short
        self._lock = threading.Lock()

    def local_path(self, path: str) -> str | None:
        return None

    def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
        with self._lock:
            self.reads.append((path, start, end))
            if self.fail_on_call is not None and len(self.reads) >= self.fail_on_call:
                raise OSError(f"connection reset while reading {path}")
        with open(path.removeprefix(URL), "rb") as fh:
            fh.seek(start)
            data = fh.read(end - start)
        if self.short:
            data = data[: len(data) // 2]
        out.write(data)
        return len(data)

    @property
    def bytes_read(self) -> int:
        return sum(end - start for _, start, end in self.reads)


def same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN (at any depth)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name].to_json(), want[name].to_json()
        assert same(g, w), (name, {k: (g[k], w[k]) for k in w if not same(g[k], w[k])})
        assert same(got[name].percentiles, want[name].percentiles), name


def assert_read_once(reader: CopyingReader, tensors: list[TensorInfo]) -> None:
    """No byte read twice, and no more than the tensors' bytes plus small gaps between them."""
    reads = sorted(reader.reads)
    for (p1, _, e1), (p2, s2, _) in zip(reads, reads[1:], strict=False):
        assert p1 != p2 or s2 >= e1, f"bytes of {p1} read twice"
    spans = sorted({s for t in tensors for s in tensor_spans(t)})
    union: list[list] = []
    for path, start, end in spans:
        if union and union[-1][0] == path and start <= union[-1][2]:
            union[-1][2] = max(union[-1][2], end)
        else:
            union.append([path, start, end])
    needed = sum(end - start for _, start, end in union)
    assert needed <= reader.bytes_read <= needed + MERGE_GAP * len(union)


# --- checkpoints made by their real producers ---------------------------------------------------


def values(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 257, generator=g)
    w[3, 5] = float("nan")
    w[7, 9] = float("inf")
    return {
        "w": w,
        "big": torch.randn(400_000, generator=g),  # 1.6 MB: over the tests' max_task_bytes
        "bf16": torch.randn(120, 64, generator=g).bfloat16(),
        "f16": torch.randn(33, 7, generator=g).half(),
        "ids": torch.randint(-1000, 1000, (500,), generator=g),
        "mask": torch.rand(90, generator=g) > 0.5,
        "bias": torch.randn(64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "const": torch.full((50,), 2.0),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("spool")
    save_file(values(1), base / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(200, 48, generator=g)
    wide = torch.randn(64, 600, generator=g)
    scales = torch.rand(32, generator=g, dtype=torch.float64) * 0.1 + 0.01
    zero_points = torch.randint(-5, 5, (32,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantize_per_channel is deprecated, still saved
        quantized = torch.quantize_per_channel(torch.randn(32, 90, generator=g), scales, zero_points, 0, torch.qint8)
    row = torch.randn(1, 300, generator=g)
    torch.save(
        {
            "model": {
                "embed.weight": emb,
                "lm_head.weight": emb,  # tied
                "proj.weight": wide.T,  # a transposed view
                "proj.sliced": wide[:, ::3],  # a strided slice of the same storage
                "pos": row.expand(40, 300),  # stride 0
                "quantized": quantized,
                "big": torch.randn(300_000, generator=g),
                "running_var": torch.ones(48),
            },
            "step": 7,
        },
        base / "trainer.pt",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({k: v for k, v in values(3).items() if k != "empty"}, checkpoint_id=base / "dcp")
    stitched_dcp(base / "stitched", {"w": torch.randn(300, 70, generator=g), "b": torch.randn(90, 40).bfloat16()})
    write_gguf(base / "m.gguf", [("q8", "Q8_0", (64, 256)), ("q4k", "Q4_K", (8, 512)), ("f32", "F32", (30, 30))])
    return {
        "safetensors": base / "model.safetensors",
        "torch": base / "trainer.pt",
        "dcp": base / "dcp" / ".metadata",
        "stitched": base / "stitched" / ".metadata",
        "gguf": base / "m.gguf",
    }


@pytest.mark.parametrize("kind", ["safetensors", "torch", "dcp", "stitched", "gguf"])
@pytest.mark.parametrize("workers", [1, 2])
def test_ranged_stats_equal_the_local_engine(files, kind, workers, tmp_path):
    local = open_checkpoint(files[kind]).tensors
    want = compute_stats(local)
    tensors = [as_urls(t) for t in local]
    reader = CopyingReader()
    got = compute_stats_ranged(tensors, reader, workers=workers, scratch_dir=str(tmp_path), max_task_bytes=256 << 10)
    assert_identical(got, want)
    assert_read_once(reader, tensors)
    tasks = plan_range_tasks(tensors, max_task_bytes=256 << 10)
    assert reader.bytes_read == sum(task.nbytes for task in tasks)
    assert sorted(reader.reads) == sorted(r for task in tasks for r in task.ranges)
    assert os.listdir(tmp_path) == []  # every spool file deleted


def test_aliases_and_views_get_their_views_stats(files, tmp_path):
    tensors = [as_urls(t) for t in open_checkpoint(files["torch"]).tensors]
    got = compute_stats_ranged(tensors, CopyingReader(), scratch_dir=str(tmp_path))
    by_name = {t.name.removeprefix("model."): got[t.name] for t in tensors}
    assert same(by_name["lm_head.weight"].to_json(), by_name["embed.weight"].to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage, for the quantized tensor
        state = torch.load(files["torch"], weights_only=True)["model"]
    for name in ("proj.weight", "proj.sliced", "pos"):  # strided views: their own values
        t = state[name]
        assert by_name[name].numel == t.numel()
        assert by_name[name].mean == pytest.approx(t.double().mean().item(), rel=1e-9)
        assert by_name[name].max == t.max().item()
    quantized = state["quantized"]  # per channel: its scales and zero points are read from the copy too
    assert by_name["quantized"].note is None
    assert by_name["quantized"].mean == pytest.approx(quantized.dequantize().double().mean().item(), rel=1e-6)
    # the tied pair is read once, and the transposed and sliced views of one storage share a task
    tasks = plan_range_tasks(tensors)
    names = [[t.name for t in task.tensors] for task in tasks]
    assert sum("model.lm_head.weight" in n or "model.embed.weight" in n for n in names) == 1
    assert any("model.proj.weight" in n and "model.proj.sliced" in n for n in names)


def test_a_tensor_larger_than_a_task_is_a_task_of_its_own(files):
    tensors = open_checkpoint(files["safetensors"]).tensors
    limit = 64 << 10
    tasks = plan_range_tasks(tensors, max_task_bytes=limit)
    (big,) = [task for task in tasks if any(t.name == "big" for t in task.tensors)]
    assert [t.name for t in big.tensors] == ["big"] and big.nbytes == 1_600_000
    assert all(task.nbytes <= limit or len(task.tensors) == 1 for task in tasks)
    assert any(len(task.tensors) > 1 for task in tasks)
    assert sum(len(task.tensors) for task in tasks) == len(tensors)
    # ordered by file and offset, a group's ranges in offset order
    firsts = [(task.ranges[0][0], task.ranges[0][1]) for task in tasks if task.ranges]
    assert firsts == sorted(firsts)
    one = plan_range_tasks(tensors)  # the default limit: one task, one range (safetensors is contiguous)
    assert len(one) == 1 and len(one[0].ranges) == 1


def test_a_stitched_tensor_is_one_task_with_a_range_per_piece(files):
    tensors = open_checkpoint(files["stitched"]).tensors
    assert all(t.pieces for t in tensors)
    tasks = plan_range_tasks(tensors)
    assert len(tasks) == len(tensors)
    for task in tasks:
        (t,) = task.tensors
        assert len(task.ranges) == len(t.pieces) == 3


def test_progress_reaches_the_total(files, tmp_path):
    tensors = open_checkpoint(files["torch"]).tensors
    seen: list[tuple[int, int]] = []
    compute_stats_ranged(tensors, CopyingReader(), progress=lambda d, t: seen.append((d, t)), max_task_bytes=64 << 10)
    unique = {t.view_key: t for t in tensors}
    total = sum(t.nbytes for t in unique.values())
    assert len(seen) >= len(plan_range_tasks(tensors, max_task_bytes=64 << 10)) > 2  # by tensor
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)


@pytest.mark.parametrize("workers", [1, 2])
def test_cancellation_stops_and_leaves_no_spool_file(files, tmp_path, workers):
    tensors = open_checkpoint(files["safetensors"]).tensors
    calls = []
    reader = CopyingReader()

    def cancelled() -> bool:
        calls.append(1)
        return len(reader.reads) >= 2

    with pytest.raises(StatsCancelled):
        compute_stats_ranged(
            tensors, reader, workers=workers, cancelled=cancelled, scratch_dir=str(tmp_path), max_task_bytes=16 << 10
        )
    assert calls and os.listdir(tmp_path) == []
    assert len(reader.reads) < len(plan_range_tasks(tensors, max_task_bytes=16 << 10))


def test_cancellation_inside_a_big_range(files, tmp_path):
    """A range arrives in many writes: cancellation is seen between them."""
    tensors = open_checkpoint(files["safetensors"]).tensors
    writes = []

    class Trickling(CopyingReader):
        def copy_range(self, path: str, start: int, end: int, out: BinaryIO) -> int:
            with open(path, "rb") as fh:
                fh.seek(start)
                for at in range(start, end, 4096):
                    out.write(fh.read(min(4096, end - at)))
                    writes.append(at)
            return end - start

    with pytest.raises(StatsCancelled):
        compute_stats_ranged(tensors, Trickling(), cancelled=lambda: len(writes) >= 3, scratch_dir=str(tmp_path))
    assert len(writes) == 3 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_read_error_propagates_and_leaves_no_spool_file(files, tmp_path, workers):
    tensors = open_checkpoint(files["torch"]).tensors
    with pytest.raises(OSError, match="connection reset"):
        compute_stats_ranged(
            tensors, CopyingReader(fail_on_call=2), workers=workers, scratch_dir=str(tmp_path), max_task_bytes=8 << 10
        )
    assert os.listdir(tmp_path) == []


def test_a_short_read_says_the_object_changed(files, tmp_path):
    tensors = open_checkpoint(files["safetensors"]).tensors
    (task,) = plan_range_tasks(tensors)
    with pytest.raises(SourceChanged, match="changed since it was listed"):
        task_stats(task, CopyingReader(short=True), scratch_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_local_files_are_mapped_where_they_lie(files, tmp_path, monkeypatch):
    tensors = open_checkpoint(files["dcp"]).tensors
    reader = LocalFileReader()
    monkeypatch.setattr(reader, "copy_range", lambda *a: pytest.fail("a local file was copied"))
    got = compute_stats_ranged(tensors, reader, scratch_dir=str(tmp_path), max_task_bytes=64 << 10)
    assert_identical(got, compute_stats(tensors))
    assert os.listdir(tmp_path) == []


def test_task_stats_keys_every_task_tensor_by_name(files, tmp_path):
    local = open_checkpoint(files["gguf"]).tensors
    want = compute_stats(local)
    tensors = [as_urls(t) for t in local]
    for task in plan_range_tasks(tensors, max_task_bytes=4 << 10):
        got = task_stats(task, CopyingReader(), scratch_dir=str(tmp_path))
        assert got.keys() == {t.name for t in task.tensors}
        assert_identical(got, {name: want[name] for name in got})
