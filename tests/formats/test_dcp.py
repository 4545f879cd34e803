"""torch.distributed.checkpoint sets: made with the real torch.distributed.checkpoint.save (one
process, and two gloo processes with FSDP2 and DTensors), listed from ``.metadata`` without
unpickling anything, compared with what ``torch.distributed.checkpoint`` itself loads; hostile
``.metadata`` variants are refused with clear codes."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint, read_dcp, read_dcp_directory
from ckptscope.formats.dcp import directory_resolver, is_dcp_metadata
from ckptscope.formats.model import Checkpoint, TensorInfo
from ckptscope.formats.sandbox import Limits, open_checkpoint_sandboxed
from ckptscope.formats.writers import OutputTensor, write_safetensors, write_torch_zip
from ckptscope.stats.engine import choose_engine, compute_stats
from ckptscope.stats.model import HIST_BINS, TensorStats
from ckptscope.stats.pieced import pieced_stats
from ckptscope.stats.walk import MappedFiles
from tests import factories as f
from tests.helpers import wait_stats

TWO_RANKS = r"""
import os, sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def extras():
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([0.0, 1.5, float("nan"), float("inf"), -2.0, 0.0, 3.0, float("-inf")])
    return {
        "cols": (torch.randn(4, 6, generator=g), [Shard(1)]),
        "uneven": (torch.randn(5, 3, generator=g), [Shard(0)]),  # 3 + 2 rows
        "tiny": (torch.randn(1, generator=g), [Shard(0)]),  # rank 1 holds an empty chunk
        "halves": (torch.randn(6, 4, generator=g).to(torch.bfloat16), [Shard(0)]),
        "counts": (torch.arange(10, dtype=torch.int64) - 3, [Shard(0)]),
        "special": (special, [Shard(0)]),
        "replicated": (torch.randn(3, generator=g), [Replicate()]),
    }


def run(rank, world, out, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    extra = {k: distribute_tensor(v, mesh, p) for k, (v, p) in extras().items()}
    dcp.save({"model": msd, "optim": osd, "extra": extra, "step": 11}, checkpoint_id=out)
    if rank == 0:
        torch.save({k: v for k, (v, _) in extras().items()}, os.path.join(os.path.dirname(out), "extras.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested state as DCP flattens it: dotted keys (list items by index)."""
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in items:
        out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """A 2-process DCP save (FSDP2 model and Adam state, DTensors sharded by rows and columns,
    an empty chunk, bf16/int64/non-finite values); the tensors and values dcp itself loads back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTSCOPE_")}
    for _attempt in range(3):  # the producer itself: gloo's teardown now and then aborts a rank
        base = tmp_path_factory.mktemp("dcp2")  # ("terminate called without an active exception")
        script = base / "save.py"
        script.write_text(TWO_RANKS)
        out = base / "ck"
        proc = subprocess.run(
            [sys.executable, str(script), str(out), str(_free_port())],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    full = base / "full.pt"
    dcp_to_torch_save(out, full)  # what torch.distributed.checkpoint loads, as a plain state dict
    loaded = flatten(torch.load(full, weights_only=True))
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in loaded.items() if not isinstance(v, torch.Tensor)}
    originals = torch.load(base / "extras.pt", weights_only=True)
    for name, value in originals.items():  # dcp's own load agrees with what was saved
        torch.testing.assert_close(tensors[f"extra.{name}"], value, rtol=0, atol=0, equal_nan=True)
    return out, tensors, values


def one_process(path: Path, state: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=path)
    return path


def reference_stats(x: torch.Tensor) -> dict[str, Any]:
    """The statistics' definitions (stats/walk.py), computed directly in float64."""
    v = x.detach().reshape(-1).to(torch.float64)
    finite = v[torch.isfinite(v)]
    out: dict[str, Any] = {
        "numel": v.numel(),
        "zeros": int((v == 0).sum()),
        "nan": int(torch.isnan(v).sum()),
        "inf": int(torch.isinf(v).sum()),
    }
    if finite.numel():
        lo, hi = float(finite.min()), float(finite.max())
        scale = HIST_BINS / (hi - lo) if hi > lo else 0.0
        bins = ((finite - lo) * scale).clamp(0, HIST_BINS - 1).to(torch.int64)
        out |= {
            "mean": float(finite.mean()),
            "std": float(finite.std()) if finite.numel() > 1 else None,
            "min": lo,
            "max": hi,
            "hist": torch.bincount(bins, minlength=HIST_BINS).tolist(),
        }
    return out


def assert_stats_match(name: str, stats: TensorStats, x: torch.Tensor) -> None:
    ref = reference_stats(x)
    counts = (stats.numel, stats.zeros, stats.nan, stats.inf)
    assert counts == (ref["numel"], ref["zeros"], ref["nan"], ref["inf"]), name
    if "mean" not in ref:
        assert stats.mean is None, name
        return
    assert stats.mean == pytest.approx(ref["mean"], rel=1e-9, abs=1e-12), name
    assert stats.min == ref["min"] and stats.max == ref["max"], name
    if ref["std"] is None:
        assert stats.std is None, name
    else:
        assert stats.std == pytest.approx(ref["std"], rel=1e-9, abs=1e-12), name
    assert stats.hist == ref["hist"], name


def assert_listing_matches(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    listed = {t.name: t for t in ckpt.tensors}
    assert set(listed) == set(tensors)
    for name, value in tensors.items():
        t = listed[name]
        assert t.dtype == str(value.dtype).removeprefix("torch."), name
        assert t.shape == tuple(value.shape) and t.numel == value.numel(), name
        assert t.nbytes == value.numel() * value.element_size(), name


# --- one process -------------------------------------------------------------------------------


def test_a_model_state_dict_saved_by_one_process(tmp_path):
    sd = f.cnn_state_dict()
    out = one_process(tmp_path / "ck", sd)
    ckpt = open_checkpoint(out / ".metadata")
    assert ckpt.format == "torch-dcp"
    assert_listing_matches(ckpt, sd)
    assert all(t.plain and not t.pieces for t in ckpt.tensors)  # one chunk each: a plain tensor
    assert [r.path for r in ckpt.roots] == [""] and ckpt.default_root == ""  # the keys were the top level
    kinds = {t.name: t.kind for t in ckpt.tensors}
    assert kinds["features.1.running_mean"] == "buffer" and kinds["head.weight"] == "parameter"
    assert ckpt.files == [str(out / ".metadata"), str(out / "__0_0.distcp")]
    stats = compute_stats(ckpt.tensors)
    for name, value in sd.items():
        assert_stats_match(name, stats[name], value)
    assert read_dcp_directory(out).tensors == ckpt.tensors
    blob = tmp_path / "blobs" / "sha256-of-the-shard"  # an upload: files found by name, stored elsewhere
    blob.parent.mkdir()
    shutil.copy(out / "__0_0.distcp", blob)
    via = read_dcp(out / ".metadata", {"__0_0.distcp": blob}.get)
    assert {t.storage.path for t in via.tensors} == {str(blob)}


def test_model_and_optimizer_state_are_separate_roots(tmp_path):
    f.seeded(3)
    model = f.SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    out = one_process(tmp_path / "ck", {"model": model.state_dict(), "optim": opt.state_dict()})
    ckpt = open_checkpoint(out / ".metadata")
    roots = {r.path: r.tensor_count for r in ckpt.roots}
    n_params = len(list(model.parameters()))
    assert roots["model"] == len(model.state_dict()) and roots["optim"] == 3 * n_params  # step, exp_avg, exp_avg_sq
    assert ckpt.default_root == "model"
    weights = ckpt.root_tensors()
    assert {t.name for t in weights} == set(model.state_dict())
    optim = {t.name: t for t in ckpt.root_tensors("optim")}
    assert optim["state.0.exp_avg"].shape == model.features[0].weight.shape
    loaded = flatten({"model": model.state_dict(), "optim": opt.state_dict()})
    assert ckpt.metadata["optim.param_groups.0.lr"] == 3e-4
    assert ckpt.metadata["optim.param_groups.0.betas"] == [0.9, 0.999]
    assert ckpt.metadata["optim.param_groups.0.params"] == list(range(n_params))
    stats = compute_stats(ckpt.tensors)
    for name, value in loaded.items():
        if isinstance(value, torch.Tensor):
            assert_stats_match(name, stats[name], value)


def test_lone_shard_of_a_set_is_refused(tmp_path):
    out = one_process(tmp_path / "ck", {"model": f.cnn_state_dict()})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(out / "__0_0.distcp")
    assert info.value.code == "dcp_shard"
    assert is_dcp_metadata(out / ".metadata") and not is_dcp_metadata(out / "__0_0.distcp")
    plain = f.save_torch({"w": torch.ones(2)}, tmp_path / "plain.pt", legacy=True)
    assert not is_dcp_metadata(plain)


# --- two processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_two_process_set_lists_and_stitches_like_dcp_loads_it(two_ranks):
    out, tensors, values = two_ranks
    ckpt = open_checkpoint(out / ".metadata")
    assert ckpt.format == "torch-dcp"
    assert_listing_matches(ckpt, tensors)
    listed = {t.name: t for t in ckpt.tensors}
    stitched = {n for n, t in listed.items() if t.pieces}
    assert {"model.0.weight", "optim.state.0.weight.exp_avg", "extra.cols", "extra.uneven"} <= stitched
    assert "extra.replicated" not in stitched and "extra.tiny" not in stitched  # one chunk (plus an empty one)
    cols = listed["extra.cols"]
    assert [p.offsets for p in cols.pieces] == [(0, 0), (0, 3)] and not cols.plain
    assert {Path(p.info.storage.path).name for p in cols.pieces} == {"__0_0.distcp", "__1_0.distcp"}
    assert [p.offsets for p in listed["extra.uneven"].pieces] == [(0, 0), (3, 0)]
    assert ckpt.default_root == "model"
    assert {"model", "optim", "extra"} <= {r.path for r in ckpt.roots}
    assert ckpt.metadata["step"] == 11 == values["step"]
    assert ckpt.metadata["optim.param_groups.0.lr"] == values["optim.param_groups.0.lr"]
    assert sorted(Path(p).name for p in ckpt.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not ckpt.warnings
    for engine in (choose_engine(), choose_engine("cpu")):
        stats = compute_stats(ckpt.tensors, engine=engine)
        for name, value in tensors.items():
            assert_stats_match(f"{engine.name}: {name}", stats[name], value)


@pytest.mark.slow
def test_pieced_stats_cover_the_whole_range_in_both_passes(two_ranks):
    """The histogram of a stitched tensor bins every piece over the whole tensor's [min, max]: a
    per-piece range would put each piece's own extremes in the first and last bins."""
    out, tensors, _ = two_ranks
    info = next(t for t in open_checkpoint(out / ".metadata").tensors if t.name == "extra.uneven")
    maps = MappedFiles()
    try:
        for engine in ("kernel", "torch-fallback"):
            stats = pieced_stats(info, maps.get, engine=engine)
            assert_stats_match(engine, stats, tensors["extra.uneven"])
            whole = tensors["extra.uneven"]
            own_ranges = [reference_stats(part)["hist"] for part in (whole[:3], whole[3:])]
            assert stats.hist != [a + b for a, b in zip(*own_ranges, strict=True)]
    finally:
        maps.close()


@pytest.mark.slow
def test_stitched_tensors_export_with_their_values(two_ranks, tmp_path):
    out, tensors, _ = two_ranks
    ckpt = open_checkpoint(out / ".metadata")
    outputs = [OutputTensor(t.name, t) for t in ckpt.tensors]
    write_safetensors(tmp_path / "all.safetensors", outputs, {})
    write_torch_zip(tmp_path / "all.pt", outputs, {})
    for got in (load_file(tmp_path / "all.safetensors"), torch.load(tmp_path / "all.pt", weights_only=True)):
        assert set(got) == set(tensors)
        for name, value in tensors.items():
            assert got[name].dtype == value.dtype, name
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, equal_nan=True)
    cast = [OutputTensor(t.name, t, "float64") for t in ckpt.tensors if t.name == "extra.halves"]
    write_safetensors(tmp_path / "cast.safetensors", cast, {})
    assert torch.equal(load_file(tmp_path / "cast.safetensors")["extra.halves"], tensors["extra.halves"].double())


def test_stitched_tensors_compare_with_the_plain_save_of_the_same_state(two_ranks):
    from ckptscope.stats.compare import compare

    out, tensors, _ = two_ranks
    stitched = {t.name: t for t in open_checkpoint(out / ".metadata").tensors}
    plain = {t.name: t for t in open_checkpoint(out.parent / "full.pt").tensors}
    compared = 0
    for name, t in stitched.items():
        if not t.pieces:
            continue
        result = compare(t, plain[name])
        assert result["identical"] is True, (name, result)
        assert result["max_abs_diff"] == 0.0
        compared += 1
    assert compared >= 2


@pytest.mark.slow
def test_the_cli_exports_a_dcp_set(two_ranks, tmp_path):
    out, tensors, _ = two_ranks
    target = tmp_path / "model.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "export", str(out / ".metadata"), "-o", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(target)
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    assert set(got) == set(model)
    for name, value in model.items():
        assert torch.equal(got[name], value), name


@pytest.mark.slow
def test_a_two_process_set_reads_in_the_sandbox(two_ranks):
    out, tensors, _ = two_ranks
    shards = {p.name: p for p in out.iterdir()}
    limits = Limits(memory_bytes=2 << 30, cpu_seconds=60, timeout_s=60)
    ckpt = open_checkpoint_sandboxed(out / ".metadata", limits=limits, shards=shards, name=".metadata")
    assert ckpt.format == "torch-dcp" and ckpt.tensors == open_checkpoint(out / ".metadata").tensors
    with pytest.raises(CheckpointError) as info:
        open_checkpoint_sandboxed(out / "__1_0.distcp", limits=limits, name="__1_0.distcp")
    assert info.value.code == "dcp_shard"


@pytest.mark.slow
def test_files_resolve_inside_the_directory_only(two_ranks, tmp_path):
    out, _, _ = two_ranks
    resolve = directory_resolver(out)
    assert resolve("__0_0.distcp") == (out / "__0_0.distcp").resolve()
    outside = tmp_path / "outside.distcp"
    outside.write_bytes(b"x")
    for name in ("../outside.distcp", str(outside), "sub/__0_0.distcp", "..", ".metadata", "missing.distcp"):
        assert resolve(name) is None, name
    linked = tmp_path / "linked"
    shutil.copytree(out, linked)
    (linked / "__1_0.distcp").unlink()
    (linked / "__1_0.distcp").symlink_to(out / "__1_0.distcp")  # a link out of the directory
    with pytest.raises(CheckpointError) as info:
        read_dcp_directory(linked)
    assert info.value.code == "missing_shard"


# --- hostile .metadata ---------------------------------------------------------------------------


class _Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.system, (f"touch {self.canary}",))


def variant(src: Path, dst: Path, mutate: Callable[[Any], None]) -> Path:
    """A copy of the set whose .metadata is rewritten (our own file: pickle.load is fine here)."""
    shutil.copytree(src, dst)
    with (dst / ".metadata").open("rb") as fh:
        md = pickle.load(fh)
    mutate(md)
    with (dst / ".metadata").open("wb") as fh:
        pickle.dump(md, fh)
    return dst / ".metadata"


def refusal(path: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    return info.value


def _key(md: Any, fqn: str, index: int = 0) -> MetadataIndex:
    return MetadataIndex(fqn, md.state_dict_metadata[fqn].chunks[index].offsets)


def _set_chunk(md: Any, fqn: str, index: int, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    md.state_dict_metadata[fqn].chunks[index] = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def _set_storage(md: Any, key: MetadataIndex, **changes: Any) -> None:
    md.storage_data[key] = dataclasses.replace(md.storage_data[key], **changes)


def _pop_storage(md: Any, key: MetadataIndex) -> None:
    del md.storage_data[key]


def _dangerous_bytes_item(md: Any, out: Path, canary: Path) -> None:
    """The non-tensor item "step" replaced by a torch.save-like archive whose pickle runs a command
    (torch.distributed.checkpoint.load unpickles such items with weights_only=False)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(canary), protocol=2))
        zf.writestr("archive/byteorder", b"little")
    shard = out / "__0_0.distcp"
    start = shard.stat().st_size
    with shard.open("ab") as fh:
        fh.write(buf.getvalue())
    key = next(k for k in md.storage_data if k.fqn == "step")
    md.storage_data[key] = dataclasses.replace(
        md.storage_data[key], relative_path="__0_0.distcp", offset=start, length=len(buf.getvalue())
    )


def _resize(md: Any, fqn: str, size: list[int]) -> None:
    md.state_dict_metadata[fqn].size = torch.Size(size)


def _repeat_first_chunk(md: Any, fqn: str, times: int) -> None:
    md.state_dict_metadata[fqn].chunks = md.state_dict_metadata[fqn].chunks[:1] * times


def _shift_item(md: Any, key: MetadataIndex, by: int) -> None:
    info = md.storage_data[key]
    md.storage_data[key] = dataclasses.replace(info, offset=info.offset + by, length=info.length - by)


def _swap_items(md: Any, a: MetadataIndex, b: MetadataIndex) -> None:
    md.storage_data[a], md.storage_data[b] = md.storage_data[b], md.storage_data[a]


def _same_bytes(md: Any, a: MetadataIndex, b: MetadataIndex) -> None:
    _set_storage(md, a, offset=md.storage_data[b].offset)


Mutation = Callable[[Any, Path, Path], None]  # (metadata, the set's directory, a canary path)
COLS0 = ("extra.cols", 0)
UNEVEN = "extra.uneven"

HOSTILE: dict[str, tuple[Mutation, str, str]] = {
    "global_os_system": (lambda md, o, c: md.planner_data.update(x=_Evil(c)), "unsafe_pickle", "system"),
    "dangerous_bytes_item": (_dangerous_bytes_item, "unsafe_pickle", "system"),
    "chunks_overlap": (lambda md, o, c: _set_chunk(md, UNEVEN, 1, (2, 0), (2, 3)), "dcp_chunks", "overlap"),
    "chunks_leave_a_gap": (lambda md, o, c: _set_chunk(md, UNEVEN, 1, (3, 0), (1, 3)), "dcp_chunks", "gap"),
    "chunk_outside_tensor": (lambda md, o, c: _set_chunk(md, UNEVEN, 1, (4, 0), (2, 3)), "dcp_chunks", "outside"),
    "chunk_of_wrong_rank": (lambda md, o, c: _set_chunk(md, UNEVEN, 1, (3,), (2,)), "dcp_chunks", "dimensions"),
    "absurd_size": (lambda md, o, c: _resize(md, UNEVEN, [2**40, 2**40]), "limit_exceeded", "elements"),
    "too_many_dims": (lambda md, o, c: _resize(md, UNEVEN, [1] * 65), "corrupt_dcp", "at most 64"),
    "one_chunk_100k_times": (lambda md, o, c: _repeat_first_chunk(md, UNEVEN, 100_000), "dcp_chunks", "overlap"),
    "range_outside_file": (
        lambda md, o, c: _set_storage(md, _key(md, *COLS0), offset=10**9),
        "corrupt_dcp",
        "lies outside",
    ),
    "path_traversal": (
        lambda md, o, c: _set_storage(md, _key(md, *COLS0), relative_path="../__0_0.distcp"),
        "corrupt_dcp",
        "plain names",
    ),
    "absolute_path": (
        lambda md, o, c: _set_storage(md, _key(md, *COLS0), relative_path="/etc/passwd"),
        "corrupt_dcp",
        "plain names",
    ),
    "items_share_bytes": (
        lambda md, o, c: _same_bytes(md, _key(md, *COLS0), _key(md, UNEVEN, 0)),
        "corrupt_dcp",
        "share bytes",
    ),
    "item_starts_inside_an_archive": (
        lambda md, o, c: _shift_item(md, _key(md, *COLS0), 1),
        "corrupt_zip",
        "__0_0.distcp",
    ),
    "chunk_without_storage": (
        lambda md, o, c: _pop_storage(md, _key(md, "extra.cols", 1)),
        "corrupt_dcp",
        "no storage entry",
    ),
    "item_of_another_shape": (
        lambda md, o, c: _swap_items(md, _key(md, *COLS0), _key(md, UNEVEN, 0)),
        "dcp_chunks",
        "shape",
    ),
    "dtype_disagrees": (
        lambda md, o, c: setattr(md.state_dict_metadata[UNEVEN].properties, "dtype", torch.float16),
        "dcp_chunks",
        "float16",
    ),
    "compressed_items": (
        lambda md, o, c: _set_storage(md, _key(md, *COLS0), transform_descriptors=["zstd/1"]),
        "unsupported_format",
        "zstd",
    ),
    "state_dict_metadata_not_a_dict": (
        lambda md, o, c: setattr(md, "state_dict_metadata", [1, 2]),
        "corrupt_dcp",
        "state_dict_metadata",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_is_refused_with_a_clear_code(two_ranks, tmp_path, case):
    out, _, _ = two_ranks
    mutate, code, fragment = HOSTILE[case]
    canary = tmp_path / "canary"
    metadata = variant(out, tmp_path / "ck", lambda md: mutate(md, tmp_path / "ck", canary))
    err = refusal(metadata)
    assert (err.code, fragment in err.message) == (code, True), err.message
    assert "\n" not in err.message and len(err.message) <= 400
    assert not canary.exists()


@pytest.mark.slow
def test_damaged_and_incomplete_sets_are_refused(two_ranks, tmp_path, monkeypatch):
    out, _, _ = two_ranks
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "__1_0.distcp").unlink()
    err = refusal(missing / ".metadata")
    assert err.code == "missing_shard" and "__1_0.distcp" in err.message
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / ".metadata").read_bytes()
    (truncated / ".metadata").write_bytes(data[: len(data) // 2])
    assert refusal(truncated / ".metadata").code == "corrupt_pickle"
    monkeypatch.setattr("ckptscope.formats.dcp.MAX_CHUNKS", 5)
    err = refusal(out / ".metadata")
    assert err.code == "limit_exceeded" and "chunks" in err.message


@pytest.mark.slow
def test_hostile_metadata_in_the_sandbox_is_a_clean_refusal(two_ranks, tmp_path):
    out, _, _ = two_ranks
    canary = tmp_path / "canary"
    metadata = variant(out, tmp_path / "ck", lambda md: md.planner_data.update(x=_Evil(canary)))
    shards = {p.name: p for p in metadata.parent.iterdir()}
    limits = Limits(memory_bytes=2 << 30, cpu_seconds=60, timeout_s=60)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint_sandboxed(metadata, limits=limits, shards=shards, name=".metadata")
    assert info.value.code == "unsafe_pickle" and not canary.exists()


# --- over REST -----------------------------------------------------------------------------------


def test_a_set_whose_metadata_is_renamed_is_found_by_content(client, two_ranks):
    out, tensors, _ = two_ranks
    files = [("file", ("run7.metadata" if p.name == ".metadata" else p.name, p.read_bytes())) for p in out.iterdir()]
    r = client.post("/api/v1/checkpoints", files=files)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "torch-dcp" and r.json()["tensor_count"] == len(tensors)


@pytest.mark.slow
def test_a_set_uploaded_over_rest(client, two_ranks):
    out, tensors, _ = two_ranks
    files = [("file", (p.name, p.read_bytes())) for p in sorted(out.iterdir())]
    r = client.post("/api/v1/checkpoints", files=files)
    assert r.status_code == 201, r.text
    checkpoint = r.json()
    assert checkpoint["format"] == "torch-dcp"
    detail = client.get(f"/api/v1/checkpoints/{checkpoint['id']}").json()
    assert detail["format"] == "torch-dcp"
    assert sorted(x["name"] for x in detail["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert wait_stats(client, checkpoint["id"])["stats_state"] == "done"
    page = client.get(f"/api/v1/checkpoints/{checkpoint['id']}/tensors", params={"root": "", "limit": 1000}).json()
    rows = {row["name"]: row for row in page["tensors"]}
    assert set(rows) == set(tensors)
    for name, value in tensors.items():
        got, ref = rows[name]["stats"], reference_stats(value)
        assert got["numel"] == ref["numel"] and got["zeros"] == ref["zeros"] and got["nan"] == ref["nan"], name
        if "mean" in ref:
            assert got["mean"] == pytest.approx(ref["mean"], rel=1e-9, abs=1e-12), name
            assert (got["min"], got["max"]) == (ref["min"], ref["max"]) and got["hist"] == ref["hist"], name
    one = client.get(f"/api/v1/checkpoints/{checkpoint['id']}/tensors/extra.cols", params={"root": ""}).json()
    assert one["shape"] == [4, 6] and one["nbytes"] == 96

    lone = client.post("/api/v1/checkpoints", files=[("file", ("__0_0.distcp", (out / "__0_0.distcp").read_bytes()))])
    assert lone.status_code == 422 and lone.json()["code"] == "dcp_shard"


def test_pieces_are_plain_tensors_of_their_chunks(tmp_path):
    """A stitched listing survives the JSON the sandbox and the catalogue use."""
    from ckptscope.formats.model import checkpoint_from_json, checkpoint_to_json

    out = one_process(tmp_path / "ck", {"w": torch.randn(4, 4)})
    ckpt = open_checkpoint(out / ".metadata")
    assert checkpoint_from_json(checkpoint_to_json(ckpt)).tensors == ckpt.tensors
    assert isinstance(ckpt.tensors[0], TensorInfo) and ckpt.tensors[0].plain
    assert math.prod(ckpt.tensors[0].shape) == 16
