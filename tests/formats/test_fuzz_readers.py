"""Bounded fuzzing of every reader: mutated real files either open or raise CheckpointError.

Anything else (an IndexError, a struct.error, a hang, a crash) is a bug. Listings that open are
also run through the stats engine, which must stay inside the file.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptscope.formats import CheckpointError, open_checkpoint
from ckptscope.stats.engine import compute_stats

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


def _seed_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    sd = {"enc.w": torch.randn(3, 4), "enc.b": torch.arange(3.0), "tied": None, "h": torch.randn(5).half()}
    sd["tied"] = sd["enc.w"]
    zip_buf, legacy_buf = io.BytesIO(), io.BytesIO()
    torch.save(sd, zip_buf)
    torch.save(sd, legacy_buf, _use_new_zipfile_serialization=False)
    from safetensors.torch import save

    st_bytes = save({k: v.contiguous() for k, v in sd.items() if k != "tied"}, metadata={"k": "v"})
    index = json.dumps({"metadata": {"total_size": 1}, "weight_map": {"enc.w": "a.safetensors"}}).encode()
    return {"zip": zip_buf.getvalue(), "legacy": legacy_buf.getvalue(), "safetensors": st_bytes, "index": index}


SEEDS = _seed_files()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "int"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "int" and len(data) >= pos + 4:  # plant a boundary integer (sizes, offsets, lengths)
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**31, 2**16, 255]))
            data[pos : pos + 4] = struct.pack("<I", value)
    return bytes(data)


def check(data: bytes, name: str = "f.bin", shard: bytes | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        if shard is not None:
            (Path(d) / "a.safetensors").write_bytes(shard)
        try:
            ckpt = open_checkpoint(path)
        except CheckpointError:
            return
        for t in ckpt.tensors:
            end = t.storage.offset + t.storage.nbytes
            assert 0 <= t.storage.offset <= end <= Path(t.storage.path).stat().st_size
        compute_stats(ckpt.tensors, workers=1)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_fuzz_single_file_readers(fmt):
    @FUZZ
    @given(mutated(SEEDS[fmt]))
    def run(data: bytes) -> None:
        check(data)

    run()


def test_fuzz_sharded_index():
    @FUZZ
    @given(mutated(SEEDS["index"]), mutated(SEEDS["safetensors"]))
    def run(index: bytes, shard: bytes) -> None:
        check(index, "model.safetensors.index.json", shard)

    run()


def test_fuzz_arbitrary_bytes():
    @FUZZ
    @given(st.binary(max_size=2048))
    def run(data: bytes) -> None:
        check(data)

    run()
