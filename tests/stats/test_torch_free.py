"""The CPU stats path never imports torch: the C kernel reads every dtype, numpy gathers views.

Fixtures are written with torch here; the statistics are computed in a fresh process that must
end without ``torch`` in ``sys.modules``, and they must equal the torch-op engine's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.formats.array_views import logical_array, row_blocks, storage_array, strided_array
from ckptscope.stats.engine import choose_engine, compute_stats
from ckptscope.stats.kernel_engine import load_kernel

pytestmark = pytest.mark.skipif(load_kernel()[0] is None, reason="the C kernel is not built")

CHILD = """
import json, sys
from ckptscope.formats import open_checkpoint
from ckptscope.stats.engine import compute_stats
from ckptscope.stats.model import TensorStats
from dataclasses import asdict
tensors = [t for p in sys.argv[1:] for t in open_checkpoint(p).tensors]
stats = compute_stats(tensors)
print(json.dumps({"torch": "torch" in sys.modules, "stats": {k: asdict(v) for k, v in stats.items()}}, default=str))
"""


def _mixed(tmp_path):
    g = torch.Generator().manual_seed(7)
    big = torch.randn(300, 4000, generator=g)  # over one chunk: walked, not batched
    tensors = {
        "f32": big,
        "bf16": big.to(torch.bfloat16),
        "f16": big.to(torch.float16),
        "f8": big.clamp(-400, 400).to(torch.float8_e4m3fn),
        "f8b": big.to(torch.float8_e5m2),
        "i8": (big * 30).clamp(-128, 127).to(torch.int8),
        "u8": (big.abs() * 30).clamp(0, 255).to(torch.uint8),
        "i64": (big * 1e6).to(torch.int64),
        "mask": big > 0.5,
        "f64": big.double(),
        "small_bf16": torch.randn(64, generator=g).to(torch.bfloat16),
    }
    st = tmp_path / "mixed.safetensors"
    save_file(tensors, str(st))
    views = {
        "transposed": big.t(),
        "transposed_bf16": big.to(torch.bfloat16).t(),
        "sliced_f16": big.to(torch.float16)[:, 1000:3500],
        "expanded": torch.randn(1, 4000, generator=g).expand(300, 4000),
        "bool_t": (big > 0).t(),
    }
    pt = tmp_path / "views.pt"
    torch.save(views, pt)
    return [st, pt]


def test_stats_of_every_dtype_and_view_are_computed_without_torch(tmp_path):
    paths = _mixed(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True, check=True, timeout=300
    )
    result = json.loads(out.stdout)
    assert result["torch"] is False
    tensors = [t for p in paths for t in open_checkpoint(p).tensors]
    reference = compute_stats(tensors, engine=choose_engine("cpu"))  # the torch-op engine
    got = result["stats"]
    assert set(got) == set(reference)
    for name, want in reference.items():
        have = got[name]
        assert have["digest"] == want.digest, name
        # the kernel bins float32 values in float32, torch in float64: a value on a bin edge may
        # move to the neighbouring bin (the engines' tests allow the same)
        assert sum(have["hist"]) == sum(want.hist), name
        moved = sum(abs(a - b) for a, b in zip(have["hist"], want.hist, strict=True))
        assert moved <= max(2, want.numel // 10000), (name, have["hist"], want.hist)
        assert (have["zeros"], have["nan"], have["inf"]) == (want.zeros, want.nan, want.inf), name
        assert (have["min"], have["max"]) == (want.min, want.max), name
        assert have["mean"] == pytest.approx(want.mean, rel=1e-9, abs=1e-12), name
        assert have["std"] == pytest.approx(want.std, rel=1e-9), name
        assert have["percentiles"] == pytest.approx(want.percentiles, rel=1e-12), name


def test_moments_alone_leave_out_percentiles_log_histogram_and_digest(tmp_path):
    tensors = [t for p in _mixed(tmp_path) for t in open_checkpoint(p).tensors]
    full = compute_stats(tensors)
    basic = compute_stats(tensors, extras=False)
    for name, st in basic.items():
        assert st.percentiles is None and st.log_hist is None and st.digest is None, name
        want = full[name]
        assert (st.hist, st.min, st.max, st.zeros, st.nan, st.inf) == (
            want.hist,
            want.min,
            want.max,
            want.zeros,
            want.nan,
            want.inf,
        ), name
        assert st.mean == want.mean and st.std == want.std, name


def test_strided_views_are_checked_against_their_storage():
    storage = np.arange(12, dtype=np.uint32)
    assert strided_array(storage, 2, (2, 5), (5, 1)).tolist() == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    assert strided_array(storage, 0, (4, 3), (1, 4)).tolist() == np.arange(12).reshape(3, 4).T.tolist()
    assert strided_array(storage, 11, (3,), (0,)).tolist() == [11, 11, 11]
    assert strided_array(storage, 12, (0, 4), (4, 1)).size == 0
    with pytest.raises(ValueError, match="beyond the end"):
        strided_array(storage, 3, (2, 5), (5, 1))  # the last element would be storage[12]
    with pytest.raises(ValueError, match="beyond the end"):
        strided_array(storage, 0, (2, 2), (1, 12))
    with pytest.raises(ValueError, match="negative"):
        strided_array(storage, 0, (2,), (-1,))


def test_row_blocks_cover_the_view_in_order_within_the_bound():
    view = np.arange(7 * 9 * 5).reshape(7, 9, 5).transpose(1, 0, 2)
    for bound in (1, 4, 5, 44, 45, 46, 400):
        blocks = list(row_blocks(view, bound))
        assert all(0 < b.size <= bound for b in blocks)
        assert np.concatenate([b.reshape(-1) for b in blocks]).tolist() == view.reshape(-1).tolist()


def test_raw_views_keep_the_bits_of_dtypes_numpy_lacks(tmp_path):
    x = torch.randn(6, 5).to(torch.bfloat16)
    path = tmp_path / "v.pt"
    torch.save({"t": x.t()}, path)
    (info,) = open_checkpoint(path).tensors
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        raw = np.ascontiguousarray(logical_array(mm, info))
        assert raw.tobytes() == x.t().contiguous().view(torch.int16).numpy().tobytes()
        assert storage_array(mm, info).size == 30
        del raw


def test_the_inspect_command_with_full_stats_imports_neither_torch_nor_the_catalogue(tmp_path):
    paths = _mixed(tmp_path)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ckptscope.cli", "inspect", "--json", str(paths[0])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["tensors"][0]["stats"]["digest"]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "ckptscope.stats.kernel_engine" in imported
    assert not {"torch", "sqlalchemy", "fastapi"} & imported
