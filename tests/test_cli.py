"""``ckptscope inspect`` run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests import factories as f


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, timeout=120)


def test_inspect_json_has_tensors_stats_and_tree(tmp_path):
    sd = f.cnn_state_dict()
    path = f.save_torch(sd, tmp_path / "cnn.pth")
    out = run_cli("inspect", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "torch-zip"
    tensors = {t["name"]: t for t in data["tensors"]}
    w = tensors["head.weight"]
    assert w["shape"] == [10, 16] and w["dtype"] == "float32" and w["numel"] == 160 and w["nbytes"] == 640
    assert w["stats"]["mean"] == pytest.approx(sd["head.weight"].double().mean().item(), rel=1e-12)
    for key in ("mean", "std", "min", "max", "l2", "zeros", "nan", "inf", "hist"):
        assert key in w["stats"]
    assert [c["name"] for c in data["tree"]["children"]] == ["features", "head"]


def test_inspect_nested_root_and_no_stats(tmp_path):
    path = f.training_checkpoint(tmp_path / "last.ckpt")
    out = run_cli("inspect", str(path), "--json", "--no-stats", "--root", "optimizer.state")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["root"] == "optimizer.state"
    assert "stats" not in data["tensors"][0]
    assert any(t["name"] == "0.exp_avg" for t in data["tensors"])
    assert data["metadata"]["epoch"] == 7


def test_inspect_table_output(tmp_path):
    path = f.save_safetensors(
        {"enc.w": torch.ones(2, 2), "enc.b": torch.tensor([float("nan"), 1.0])}, tmp_path / "x.safetensors"
    )
    out = run_cli("inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert "safetensors" in out.stdout and "enc" in out.stdout and "NaN 1" in out.stdout


def test_unreadable_files_exit_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    out = run_cli("inspect", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "unrecognised file" in out.stderr
    out = run_cli("inspect", str(tmp_path / "missing.pt"))
    assert out.returncode == 2 and "No such file" in out.stderr
    good = f.save_torch({"a": torch.zeros(1)}, tmp_path / "a.pt")
    out = run_cli("inspect", str(good), "--root", "nope")
    assert out.returncode == 2 and "no root 'nope'" in out.stderr
