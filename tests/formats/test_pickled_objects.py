"""Pickles read as inert data: plain objects beside the weights become metadata, whole pickled
modules give their parameters and buffers (labelled by the file), meta tensors are listed; nothing
named in the file is imported, in-process or in the sandbox."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import pathlib
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptscope.formats import open_checkpoint
from ckptscope.formats.sandbox import Limits, open_checkpoint_sandboxed
from tests.helpers import ROOT

LIMITS = Limits(memory_bytes=4 << 30, cpu_seconds=60, timeout_s=120)


class Block(torch.nn.Module):  # a class the sandbox cannot import (it lives in the test tree only)
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.register_buffer("pe", torch.randn(5))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.scale = torch.nn.Parameter(torch.ones(3))


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class RunConfig:
    lr: float = 0.01
    layers: tuple[int, ...] = (2, 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), torch.nn.Flatten(), torch.nn.Linear(3, 4))


@pytest.mark.parametrize("sandboxed", [False, True], ids=["in-process", "sandbox"])
def test_a_whole_module_pickle_reads_as_its_state_dict(tmp_path: Path, sandboxed: bool):
    model = _model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    ckpt = open_checkpoint_sandboxed(path, limits=LIMITS) if sandboxed else open_checkpoint(path)
    sd = model.state_dict()
    assert [t.name for t in ckpt.tensors] == list(sd)  # same names, same order, no non-persistent buffer
    buffers = {name for name, _ in model.named_buffers()}
    for t in ckpt.tensors:
        assert t.kind == ("buffer" if t.name in buffers else "parameter"), t.name
        assert t.kind_source == "file"
        assert list(t.shape) == list(sd[t.name].shape)
    assert ckpt.module_types[""] == "torch.nn.modules.container.Sequential"
    assert ckpt.module_types["0"].endswith("test_pickled_objects.Block")
    assert ckpt.module_types["0.conv"] == "torch.nn.modules.conv.Conv2d"
    assert ckpt.module_types["0.norm"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    report = ckpt.pickle
    assert report is not None and report["weights_only_loadable"] is False
    roles = {g["name"]: g["role"] for g in report["globals"]}
    assert roles["torch.nn.modules.conv.Conv2d"] == "object"
    assert roles["torch._utils._rebuild_parameter"] == "tensor"


def test_the_stats_of_a_whole_module_pickle_match_its_tensors(tmp_path: Path):
    from ckptscope.stats.engine import compute_stats

    model = _model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    ckpt = open_checkpoint(path)
    stats = compute_stats(ckpt.tensors, workers=1)
    for name, value in model.state_dict().items():
        x = value.double()
        assert stats[name].mean == pytest.approx(float(x.mean()), rel=1e-9, abs=1e-12)
        assert stats[name].max == pytest.approx(float(x.max()))


def test_plain_objects_beside_the_weights_are_metadata(tmp_path: Path):
    sd = torch.nn.Linear(2, 2).state_dict()
    path = tmp_path / "train.pt"
    torch.save(
        {
            "model": sd,
            "args": argparse.Namespace(lr=0.1, name="run-7", layers=[1, 2]),
            "cfg": RunConfig(),
            "ns": types.SimpleNamespace(seed=3),
            "color": Color.RED,
            "when": datetime.datetime(2026, 3, 4, 5, 6, 7, 8),
            "day": datetime.date(2026, 3, 4),
            "took": datetime.timedelta(seconds=90),
            "dir": pathlib.Path("/data/run"),
            "rng": np.random.get_state(),
            "best": np.float32(0.25),
            "hist": np.arange(4, dtype=np.int64),
        },
        path,
    )
    ckpt = open_checkpoint(path)
    assert ckpt.default_root == "model" and {t.name for t in ckpt.tensors} == {"model.weight", "model.bias"}
    meta = ckpt.metadata
    assert meta["args"] == {"__class__": "argparse.Namespace", "lr": 0.1, "name": "run-7", "layers": [1, 2]}
    assert meta["cfg"]["__class__"].endswith("RunConfig") and meta["cfg"]["lr"] == 0.01
    assert meta["ns"] == {"__class__": "types.SimpleNamespace", "seed": 3}
    assert meta["color"]["__class__"].endswith("Color") and meta["color"]["args"] == [1]
    assert meta["when"] == "2026-03-04T05:06:07.000008"
    assert meta["day"] == "2026-03-04"
    assert meta["took"].startswith("0 days, 90")
    assert meta["dir"] == "/data/run"
    assert meta["rng"][0] == "MT19937" and "624" in meta["rng"][1]
    assert meta["best"] == 0.25
    assert meta["hist"] == "<numpy array i8 [4] [0, 1, 2, 3]>"
    json.dumps(meta)  # JSON-ready as it is


def test_parameters_beside_plain_tensors_tell_the_buffers(tmp_path: Path):
    model = torch.nn.BatchNorm1d(3)
    path = tmp_path / "keep_vars.pt"
    torch.save(model.state_dict(keep_vars=True), path)  # Parameters stay Parameters
    kinds = {t.name: (t.kind, t.kind_source) for t in open_checkpoint(path).tensors}
    assert kinds == {
        "weight": ("parameter", "file"),
        "bias": ("parameter", "file"),
        "running_mean": ("buffer", "file"),
        "running_var": ("buffer", "file"),
        "num_batches_tracked": ("buffer", "file"),
    }
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)  # plain tensors: a guess from the names
    assert {t.kind_source for t in open_checkpoint(plain).tensors} == {"name"}


def test_diffusion_schedules_are_buffers_by_name(tmp_path: Path):
    path = tmp_path / "sd.ckpt"
    torch.save(
        {
            "state_dict": {
                "betas": torch.linspace(1e-4, 0.02, 10),
                "alphas_cumprod": torch.rand(10),
                "model.diffusion_model.out.weight": torch.randn(2, 2),
                "model_ema.decay": torch.tensor(0.999),
            }
        },
        path,
    )
    kinds = {t.name: t.kind for t in open_checkpoint(path).tensors}
    assert kinds["state_dict.betas"] == kinds["state_dict.alphas_cumprod"] == "buffer"
    assert kinds["state_dict.model_ema.decay"] == "buffer"
    assert kinds["state_dict.model.diffusion_model.out.weight"] == "parameter"


def test_meta_device_tensors_are_listed_without_data(tmp_path: Path):
    from ckptscope.stats.engine import compute_stats

    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    path = tmp_path / "meta.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    ckpt = open_checkpoint(path)
    assert [(t.name, t.shape, t.dtype) for t in ckpt.tensors] == [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in loaded.items()
    ]
    assert all(t.encoding == "meta" and t.nbytes == 0 for t in ckpt.tensors)
    stats = compute_stats(ckpt.tensors, workers=1)
    assert all(s.mean is None and s.note for s in stats.values())


def test_nothing_named_in_the_file_is_imported(tmp_path: Path):
    """A pickle naming a module that exists only in this test tree and would write a file when
    imported: reading it (in a fresh interpreter) must leave no trace."""
    pkg = tmp_path / "trap_pkg"
    pkg.mkdir()
    canary = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(canary)!r}, 'w').write('x')\nclass Thing: pass\n")
    script = f"""
import sys, torch
sys.path.insert(0, {str(tmp_path)!r})
import trap_pkg
torch.save({{"w": torch.ones(2), "thing": trap_pkg.Thing()}}, {str(tmp_path / "trap.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    canary.unlink()
    check = f"""
import sys
from ckptscope.formats import open_checkpoint
ckpt = open_checkpoint({str(tmp_path / "trap.pt")!r})
assert ckpt.metadata["thing"] == {{"__class__": "trap_pkg.Thing"}}, ckpt.metadata
assert "trap_pkg" not in sys.modules
"""
    env_path = f"{tmp_path}"  # the trap is importable: reading must still not import it
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{env_path}"})
    assert not canary.exists()


def test_a_refused_pickle_names_the_call_and_carries_the_report(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (subprocess.check_output, (["touch", str(tmp_path / "pwned")],))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    from ckptscope.errors import CheckpointError

    with pytest.raises(CheckpointError) as err:
        open_checkpoint_sandboxed(path, limits=LIMITS)
    assert err.value.code == "unsafe_pickle"
    assert "subprocess.check_output(['touch'" in str(err.value)
    report = err.value.extra["pickle"]
    assert {"name": "subprocess.check_output", "count": 1, "role": "refused"} in report["globals"]
    assert report["weights_only_loadable"] is False
    assert not (tmp_path / "pwned").exists()


def _quantized_file(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    tensors = {
        "per_tensor": torch.quantize_per_tensor(torch.randn(6, 4), 0.05, 2, torch.qint8),
        "per_channel": torch.quantize_per_channel(
            torch.randn(3, 5),
            torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64),
            torch.tensor([0, 3, 1]),
            0,
            torch.quint8,
        ),
        "per_channel_axis1": torch.quantize_per_channel(
            torch.randn(4, 3),
            torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
            torch.tensor([1, 0, 2]),
            1,
            torch.qint8,
        ),
    }
    torch.save(tensors, path)
    return tensors


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_quantized_selection_exports_as_its_dequantized_values(tmp_path: Path, fmt: str):
    from ckptscope.services.operations import dequantized, export_with_plan, write_checkpoint

    original = _quantized_file(tmp_path / "q.pt")
    ckpt = open_checkpoint(tmp_path / "q.pt")
    assert {t.name: t.shown_dtype for t in ckpt.tensors} == {
        "per_tensor": "qint8",
        "per_channel": "quint8",
        "per_channel_axis1": "qint8",
    }
    for dtype, tolerance in ((None, 1e-6), ("bfloat16", 1e-2)):
        outputs, _ = export_with_plan(ckpt.tensors, [], [], None, [], dtype)
        summary = dequantized(outputs)
        assert summary is not None and summary["tensors"] == 3
        out = tmp_path / f"out-{dtype}.{fmt}"
        write_checkpoint(out, outputs, fmt, {})
        if fmt == "safetensors":
            from safetensors.torch import load_file

            written = load_file(out)
        else:
            written = torch.load(out, weights_only=True)
        for name, q in original.items():
            assert written[name].dtype == (torch.float32 if dtype is None else torch.bfloat16)
            assert torch.allclose(written[name].float(), q.dequantize(), atol=tolerance, rtol=tolerance), name
