"""Listing a checkpoint in an object store from its header byte ranges (formats/ranged.py).

``LocalObjects`` serves real files, made by the real producers in a temp dir, under fake
"s3://t/..." URLs and counts what it serves. Each format's ranged listing must equal
``open_checkpoint`` on the local file (paths mapped) while reading a small part of it."""

from __future__ import annotations

import json
import struct
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from ckptscope.errors import CheckpointError, SourceNotFound
from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import checkpoint_to_json
from ckptscope.formats.ranged import RangedReport, open_ranged_checkpoint
from ckptscope.formats.sandbox import Limits
from tests.factories import save_safetensors, save_torch, sharded_safetensors

KIB, MIB = 1024, 1024 * 1024
LIMITS = Limits(memory_bytes=2 * 1024**3, cpu_seconds=20, timeout_s=60)


class LocalObjects:
    """A RemoteObjects over a local directory: "s3://t/<relative path>"; counts what it serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0
        self.calls: list[tuple[str, str]] = []

    def _path(self, url: str) -> Path:
        assert url.startswith("s3://t"), url
        relative = url.removeprefix("s3://t").strip("/")
        assert ".." not in relative.split("/"), url
        return self.root / relative

    def stat(self, url: str) -> int | None:
        with self.lock:
            self.calls.append(("stat", url))
        path = self._path(url)
        return path.stat().st_size if path.is_file() else None

    def read(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        with self._path(url).open("rb") as fh:
            for start, end in ranges:
                assert 0 <= start < end, (url, start, end)
                fh.seek(start)
                out.append(fh.read(end - start))
        with self.lock:
            self.calls.append(("read", url))
            self.bytes += sum(e - s for s, e in ranges)
            self.requests += len(ranges)
        return out

    def listdir(self, url: str) -> dict[str, int] | None:
        with self.lock:
            self.calls.append(("listdir", url))
        path = self._path(url)
        if not path.is_dir():
            return None
        return {c.name: c.stat().st_size for c in path.iterdir() if c.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path.resolve()


def _listing(ckpt: Any, root: Path | None = None) -> Any:
    text = json.dumps(checkpoint_to_json(ckpt))
    if root is not None:  # the URLs as the local paths they stand for
        text = text.replace("s3://t", str(root))
    return json.loads(text)


def ranged_equals_local(
    root: Path, relative: str, local: Path | None = None, **kwargs: Any
) -> tuple[RangedReport, LocalObjects]:
    objects = LocalObjects(root)
    ckpt, report = open_ranged_checkpoint(f"s3://t/{relative}", objects, **kwargs)
    expected = _listing(open_checkpoint(local or root / relative.rstrip("/")))
    assert _listing(ckpt, root) == expected
    assert report.bytes_read == objects.bytes and report.requests == objects.requests
    return report, objects


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


# --- every format ------------------------------------------------------------------------------


def test_single_safetensors_reads_its_header_only(root: Path) -> None:
    tensors = {"big": torch.zeros(4096, 4096), **{f"layer{i}.bias": torch.ones(7) * i for i in range(40)}}
    path = save_safetensors(tensors, root / "model.safetensors", metadata={"format": "pt"})
    assert path.stat().st_size > 64 * MIB
    report, _ = ranged_equals_local(root, "model.safetensors")
    assert report.rounds == 1
    assert report.bytes_read < 256 * KIB
    assert report.objects == {"s3://t/model.safetensors": path.stat().st_size}
    assert len(report.header_digest) == 64


def test_safetensors_header_beyond_the_first_64_kib(root: Path) -> None:
    tensors = {f"a.very.long.tensor.name.to.grow.the.header.{i:05d}": torch.full((3,), float(i)) for i in range(3000)}
    tensors["tail"] = torch.zeros(1024, 1024)  # 4 MiB of data after the header
    save_safetensors(tensors, root / "wide.safetensors")
    report, _ = ranged_equals_local(root, "wide.safetensors")
    assert report.rounds == 2
    assert report.bytes_read < 1 * MIB


def test_sharded_safetensors_index(root: Path) -> None:
    tensors = {f"block{i}.weight": torch.randn(256, 256) for i in range(6)}
    sharded_safetensors(root, tensors, shards=3)
    report, objects = ranged_equals_local(root, "model.safetensors.index.json")
    assert report.rounds == 2  # the index, then every shard at once
    assert len(report.objects) == 4
    assert report.bytes_read < _size(root) / 3
    shard_reads = [url for kind, url in objects.calls if kind == "read" and url.endswith(".safetensors")]
    assert len(shard_reads) == 3


def test_sharded_torch_bin_index(root: Path) -> None:
    weight_map = {}
    for i in range(2):
        shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        part = {f"h{i}.{j}.weight": torch.randn(256, 256) for j in range(8)}
        save_torch(part, root / shard)
        weight_map |= dict.fromkeys(part, shard)
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    report, _ = ranged_equals_local(root, "pytorch_model.bin.index.json")
    assert report.rounds <= 4
    assert report.bytes_read < _size(root) / 2


def test_torch_zip_of_300_tensors(root: Path) -> None:
    state = {f"layers.{i}.weight": torch.randn(128, 128) for i in range(300)}
    path = save_torch(state, root / "model.pt")
    report, _ = ranged_equals_local(root, "model.pt")
    assert report.rounds <= 4
    assert report.bytes_read < path.stat().st_size / 8


def test_torch_zip_whose_directory_is_beyond_the_tail(root: Path) -> None:
    state = {f"encoder.layers.{i}.self_attention.output.dense.weight": torch.randn(64, 64) for i in range(1500)}
    path = save_torch(state, root / "model.pt")
    report, _ = ranged_equals_local(root, "model.pt")
    assert report.rounds == 3  # tail -> central directory -> data.pkl and the local headers
    assert report.bytes_read < path.stat().st_size / 2


def test_training_checkpoint_nested_with_optimizer(root: Path) -> None:
    from tests.factories import training_checkpoint

    training_checkpoint(root / "last.ckpt")
    ranged_equals_local(root, "last.ckpt")


def test_legacy_torch(root: Path) -> None:
    state = {f"layers.{i}.weight": torch.randn(128, 128) for i in range(60)}
    path = save_torch(state, root / "legacy.pt", legacy=True)
    report, _ = ranged_equals_local(root, "legacy.pt")
    assert report.rounds <= 3
    assert report.bytes_read < path.stat().st_size / 4


def _gguf(path: Path) -> Path:
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("ranged test")
    writer.add_token_list([f"<tok{i}>" for i in range(3000)])
    values = rng.standard_normal((512, 4096)).astype(np.float32)
    writer.add_tensor(
        "blk.0.ffn.weight", quants.quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.norm.weight", rng.standard_normal(4096).astype(np.float32))
    writer.add_tensor("output.weight", rng.standard_normal((256, 1024)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_a_quantised_type(root: Path) -> None:
    path = _gguf(root / "model.gguf")
    assert path.stat().st_size > 2 * MIB
    report, _ = ranged_equals_local(root, "model.gguf")
    assert report.rounds <= 3
    assert report.bytes_read < path.stat().st_size / 2  # the header, and the reader's 1 MiB read-ahead


def _dcp_directory(root: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {
        "model": {f"layer{i}.weight": torch.randn(256, 256) for i in range(12)},
        "bias": torch.zeros(4, dtype=torch.bfloat16),
        "step": 11,
    }
    out = root / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)))
    return out


@pytest.mark.parametrize("url", ["dcp/", "dcp", "dcp/.metadata"])
def test_dcp_directory(root: Path, url: str) -> None:
    out = _dcp_directory(root)
    report, _ = ranged_equals_local(root, url, local=out / ".metadata" if url.endswith(".metadata") else out)
    assert report.rounds <= 4
    assert report.bytes_read < _size(out) / 2


def test_hf_folder_with_sharded_safetensors(root: Path) -> None:
    folder = root / "gpt"
    folder.mkdir()
    sharded_safetensors(folder, {f"h.{i}.attn.weight": torch.randn(200, 200) for i in range(4)}, shards=2)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    report, objects = ranged_equals_local(root, "gpt")
    assert ("listdir", "s3://t/gpt") in objects.calls
    assert report.rounds <= 3
    assert report.bytes_read < _size(folder) / 2


# --- the sandboxed child -----------------------------------------------------------------------


def _zip_and_shards(root: Path) -> list[str]:
    save_torch({f"layers.{i}.weight": torch.randn(64, 64) for i in range(200)}, root / "model.pt")
    sharded_safetensors(root, {f"b{i}.w": torch.randn(32, 32) for i in range(4)}, shards=2)
    return ["model.pt", "model.safetensors.index.json"]


def _legacy_gguf_dcp(root: Path) -> list[str]:
    save_torch({f"w{i}": torch.randn(64, 64) for i in range(30)}, root / "legacy.pt", legacy=True)
    _gguf(root / "model.gguf")
    _dcp_directory(root)
    return ["legacy.pt", "model.gguf", "dcp/"]


@pytest.mark.parametrize("make", [_zip_and_shards, _legacy_gguf_dcp])
def test_sandboxed_rounds_give_the_same_listing(root: Path, make: Any) -> None:
    for name in make(root):
        in_process, report = open_ranged_checkpoint(f"s3://t/{name}", LocalObjects(root))
        sandboxed, boxed_report = open_ranged_checkpoint(f"s3://t/{name}", LocalObjects(root), limits=LIMITS)
        assert _listing(sandboxed) == _listing(in_process)
        assert boxed_report.header_digest == report.header_digest
        assert boxed_report.rounds == report.rounds and boxed_report.bytes_read == report.bytes_read
        assert boxed_report.objects == report.objects


def test_sandboxed_refusal_is_the_same_error(root: Path) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    for limits in (None, LIMITS):
        with pytest.raises(CheckpointError) as caught:
            open_ranged_checkpoint("s3://t/model.safetensors.index.json", LocalObjects(root), limits=limits)
        assert caught.value.code == "bad_index"


# --- the header digest -------------------------------------------------------------------------


def _digest(root: Path, name: str) -> str:
    return open_ranged_checkpoint(f"s3://t/{name}", LocalObjects(root))[1].header_digest


def test_header_digest_follows_the_header_not_the_data(root: Path) -> None:
    tensors = {"w": torch.zeros(256, 256), "z": torch.zeros(64, 1024)}
    path = save_safetensors(tensors, root / "a.safetensors", metadata={"step": "1000"})
    before = _digest(root, "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a byte of tensor "z": data only
    path.write_bytes(bytes(data))
    assert _digest(root, "a.safetensors") == before
    data[data.index(b"1000")] = ord("2")  # the same length: only a header byte changes
    path.write_bytes(bytes(data))
    assert _digest(root, "a.safetensors") != before


def test_header_digest_does_not_depend_on_where_the_checkpoint_lies(root: Path) -> None:
    (root / "x").mkdir()
    (root / "y").mkdir()
    sharded_safetensors(root / "x", {"a": torch.ones(3), "b": torch.ones(4)}, shards=2)
    sharded_safetensors(root / "y", {"a": torch.ones(3), "b": torch.ones(4)}, shards=2)
    assert _digest(root, "x/model.safetensors.index.json") == _digest(root, "y/model.safetensors.index.json")


# --- hostile and missing -----------------------------------------------------------------------


def test_safetensors_header_length_past_the_end(root: Path) -> None:
    path = save_safetensors({"w": torch.zeros(1024, 256)}, root / "bad.safetensors")
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    path.write_bytes(bytes(data))
    objects = LocalObjects(root)
    with pytest.raises(CheckpointError) as caught:
        open_ranged_checkpoint("s3://t/bad.safetensors", objects)
    assert caught.value.code == "truncated"
    assert objects.bytes <= 128 * KIB


def test_zip_whose_directory_claims_huge_entries(root: Path) -> None:
    path = save_torch({f"w{i}": torch.randn(128, 128) for i in range(20)}, root / "huge.pt")
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # every entry of the central directory claims 2 GiB
        data[at + 20 : at + 28] = struct.pack("<II", 0x7FFFFFF0, 0x7FFFFFF0)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))
    objects = LocalObjects(root)
    with pytest.raises(CheckpointError) as caught:
        open_ranged_checkpoint("s3://t/huge.pt", objects)
    assert caught.value.code == "corrupt_zip"
    assert objects.bytes < len(data) / 4


def test_index_naming_a_parent_directory(root: Path) -> None:
    (root / "sub").mkdir()
    save_safetensors({"a": torch.ones(2)}, root / "x.safetensors")  # what "../x" would reach
    index = {"weight_map": {"a": "../x.safetensors"}}
    (root / "sub" / "model.safetensors.index.json").write_text(json.dumps(index))
    objects = LocalObjects(root)
    with pytest.raises(CheckpointError) as caught:
        open_ranged_checkpoint("s3://t/sub/model.safetensors.index.json", objects)
    assert caught.value.code == "bad_index"
    assert all(not url.endswith("x.safetensors") for _, url in objects.calls)


def test_missing_shard(root: Path) -> None:
    sharded_safetensors(root, {"a": torch.ones(3), "b": torch.ones(4)}, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        open_ranged_checkpoint("s3://t/model.safetensors.index.json", LocalObjects(root))
    assert caught.value.code == "missing_shard"


def test_no_such_object(root: Path) -> None:
    with pytest.raises(SourceNotFound):
        open_ranged_checkpoint("s3://t/nothing.safetensors", LocalObjects(root))


def test_rounds_and_bytes_are_bounded(root: Path) -> None:
    state = {f"encoder.layers.{i}.self_attention.output.dense.weight": torch.randn(64, 64) for i in range(1500)}
    save_torch(state, root / "model.pt")
    with pytest.raises(CheckpointError, match="more than 2 rounds") as caught:
        open_ranged_checkpoint("s3://t/model.pt", LocalObjects(root), max_rounds=2)
    assert caught.value.code == "limit_exceeded"
    with pytest.raises(CheckpointError, match="bytes of reads") as caught:
        open_ranged_checkpoint("s3://t/model.pt", LocalObjects(root), max_header_bytes=200 * KIB)
    assert caught.value.code == "limit_exceeded"


def test_trainer_folder_reads_each_file_in_the_same_rounds(root: Path) -> None:
    folder = root / "checkpoint-1"
    folder.mkdir()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    save_safetensors(dict(model.state_dict()), folder / "model.safetensors")
    save_torch(optimizer.state_dict(), folder / "optimizer.pt")
    save_torch({"last_epoch": 1, "_step_count": 2}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 1, "epoch": 0.5, "log_history": [{"loss": 2}]})
    )
    report, _ = ranged_equals_local(root, "checkpoint-1/")
    assert report.rounds <= 4
    assert set(report.objects) >= {f"s3://t/checkpoint-1/{n}" for n in ("model.safetensors", "optimizer.pt")}


def test_a_round_that_asks_outside_the_checkpoint_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptscope.formats.ranged as ranged

    save_safetensors({"a": torch.ones(2)}, root / "a.safetensors")

    def hijacked(cache: Any, url: str, name: str | None) -> Any:
        outcome = ranged.run_round_in_process(cache, url, name)
        outcome.misses.objects.add("s3://elsewhere/secret")
        return outcome

    objects = LocalObjects(root)
    with pytest.raises(CheckpointError) as caught:
        ranged._rounds(ranged._Fetcher(objects, ranged.MAX_HEADER_BYTES), "s3://t/a.safetensors", None, 8, hijacked)
    assert caught.value.code == "blocked_operation"
    assert all("elsewhere" not in url for _, url in objects.calls)


# --- the ranged path itself --------------------------------------------------------------------


def test_ranged_file_reads_zeros_for_missing_bytes_and_notes_them(root: Path) -> None:
    import zipfile

    from ckptscope.formats.ranged_path import PieceCache, RangedContext

    path = save_torch({"w": torch.arange(6.0)}, root / "w.pt")
    data = path.read_bytes()
    cache = PieceCache()
    cache.set_size("s3://t/w.pt", len(data))
    cache.add("s3://t/w.pt", 0, data[:100])
    ctx = RangedContext(cache)
    with ctx.path("s3://t/w.pt").open() as fh:
        assert fh.read(120) == data[:100] + bytes(20)
    assert ctx.misses.ranges.merged("s3://t/w.pt") == [(100, 120)]
    assert ctx.reads.ranges.merged("s3://t/w.pt") == [(0, 100)]

    cache.add("s3://t/w.pt", 100, data[100:])  # everything cached: zipfile reads it as a file
    ctx = RangedContext(cache)
    with zipfile.ZipFile(ctx.path("s3://t/w.pt").open()) as archive:
        assert any(n.endswith("data.pkl") for n in archive.namelist())
    assert not ctx.misses

    shard = ctx.path("s3://t/w.pt").parent / "other.pt"  # not stat'ed yet: exists, empty, noted
    assert str(shard) == "s3://t/other.pt" and shard.name == "other.pt"
    assert shard.is_file() and shard.stat().st_size == 0
    assert ctx.misses.objects == {"s3://t/other.pt"}
    cache.set_size("s3://t/other.pt", None)
    assert not RangedContext(cache).path("s3://t/other.pt").is_file()
    with pytest.raises(ValueError):
        _ = shard.parent / ".."
