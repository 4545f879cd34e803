"""``ckptscope`` run as a user runs it, a real subprocess: inspect, and copy/freeze/export/diff."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys

import pytest
import torch

from tests import factories as f
from tests.helpers import assert_state_equal, models
from tests.test_cli_conventions import assert_error


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, timeout=timeout
    )


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
    assert out.returncode == 3  # unreadable input
    assert out.stderr.strip().count("\n") == 0 and "unrecognised file" in out.stderr
    out = run_cli("inspect", str(tmp_path / "missing.pt"))
    assert out.returncode == 3 and "No such file" in out.stderr
    good = f.save_torch({"a": torch.zeros(1)}, tmp_path / "a.pt")
    out = run_cli("inspect", str(good), "--root", "nope")
    assert out.returncode == 2 and "no root 'nope'" in out.stderr


def test_cli_copy_freeze_export_diff(tmp_path):
    run = functools.partial(run_cli, timeout=180)
    a, b = models()
    pa = f.save_torch(a.state_dict(), tmp_path / "a.pt")
    pb = f.save_safetensors(b.state_dict(), tmp_path / "b.safetensors")
    out = tmp_path / "c.safetensors"
    r = run("copy", str(pa), str(pb), "--map", "nn_same=nn_same", "-o", str(out))
    assert r.returncode == 0, r.stderr
    expected = copy.deepcopy(b)
    expected.nn_same.load_state_dict(a.nn_same.state_dict())
    from safetensors.torch import load_file

    assert_state_equal(load_file(out), expected.state_dict())

    r = run("copy", str(pa), str(pb), "--map", "nn_same=head", "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["written"] is False
    r = run("copy", str(pa), str(pb), "--map", "nn_same=head", "-o", str(tmp_path / "x.safetensors"))
    assert r.returncode == 1 and "strict copy refused" in r.stderr and not (tmp_path / "x.safetensors").exists()

    r = run("freeze", str(pa), "--freeze", "nn_same", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["trainable"] == ["head.weight", "head.bias"]
    r = run("freeze", str(pa), "--freeze", "nn_same", "--snippet")
    assert "requires_grad_(False)" in r.stdout

    exported = tmp_path / "head.pt"
    r = run("export", str(pa), "--include", "head", "--rename", "head=classifier", "-o", str(exported))
    assert r.returncode == 0, r.stderr
    got = torch.load(exported, weights_only=True)
    assert set(got) == {"classifier.weight", "classifier.bias"} and torch.equal(got["classifier.weight"], a.head.weight)

    r = run("diff", str(pb), str(out), "--json")
    assert r.returncode == 1  # they differ
    counts = json.loads(r.stdout)["counts"]
    unchanged = [k for k, v in expected.state_dict().items() if torch.equal(v, b.state_dict()[k])]
    assert counts["identical"] == len(unchanged) and counts["changed"] == len(b.state_dict()) - len(unchanged)
    r = run("diff", str(pb), str(out))
    assert "changed" in r.stdout and "nn_same.0.weight" in r.stdout


# --- every input parsed in the server's sandbox --------------------------------------------------


def _run_cli_env(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def _hash_bomb(path):
    """A 167-byte pickle whose dict key is a tuple of 80 nested pairs of itself: hashing it takes
    2**80 steps. Parsed in-process, the CLI would hang for good."""
    path.write_bytes(b"\x80\x02}" + b")" + b"2\x86" * 80 + b"K\x01s.")
    return path


def test_cli_parses_every_input_in_a_fresh_sandbox(tmp_path, monkeypatch, capsys):
    """No command parses a file in-process: each input goes to its own sandboxed child, with the
    server's limits (CKPTSCOPE_PARSE_*) and shards looked up beside a local index."""
    import ckptscope.formats
    import ckptscope.formats.sandbox as sandbox
    from ckptscope import cli
    from ckptscope.config import Settings

    def in_process(*args, **kwargs):
        raise AssertionError("the CLI parsed a file in its own process")

    monkeypatch.setattr(ckptscope.formats, "open_checkpoint", in_process)
    real = sandbox.open_checkpoint_sandboxed
    calls = []

    def recorded(path, **kwargs):
        calls.append((str(path), kwargs))
        return real(path, **kwargs)

    monkeypatch.setattr(sandbox, "open_checkpoint_sandboxed", recorded)
    monkeypatch.setenv("CKPTSCOPE_PARSE_CPU_SECONDS", "7")
    monkeypatch.chdir(tmp_path)
    a, b = models()
    f.save_torch(a.state_dict(), tmp_path / "a.pt")
    f.save_safetensors(b.state_dict(), tmp_path / "b.safetensors")
    commands = [
        (["inspect", "a.pt", "--no-stats"], ["a.pt"]),
        (["inspect", "b.safetensors", "--json"], ["b.safetensors"]),
        (["export", "a.pt", "--include", "head", "-o", "h.safetensors"], ["a.pt"]),
        (["copy", "a.pt", "b.safetensors", "--map", "nn_same=nn_same", "--dry-run"], ["a.pt", "b.safetensors"]),
        (["freeze", "a.pt", "--freeze", "nn_same"], ["a.pt"]),
        (["diff", "a.pt", "b.safetensors"], ["a.pt", "b.safetensors"]),
    ]
    for argv, inputs in commands:
        calls.clear()
        assert cli.main(argv) == (1 if argv[0] == "diff" else 0), capsys.readouterr()  # diff: a and b differ
        assert [path for path, _ in calls] == [str(tmp_path / name) for name in inputs]  # absolute
        for _, kwargs in calls:
            assert kwargs == {"limits": Settings().parse_limits, "shards": None}
            assert kwargs["limits"].cpu_seconds == 7
    assert (tmp_path / "h.safetensors").exists()


def test_cli_a_hanging_parse_ends_within_seconds_and_spares_the_next_file(tmp_path):
    import time

    bomb = _hash_bomb(tmp_path / "bomb.pkl")
    good = f.save_torch({"w": torch.ones(3)}, tmp_path / "good.pt")
    limits = {"CKPTSCOPE_PARSE_CPU_SECONDS": "2", "CKPTSCOPE_PARSE_TIMEOUT_S": "6"}
    start = time.monotonic()
    out = _run_cli_env("inspect", str(bomb), "--no-stats", timeout=60, **limits)
    assert time.monotonic() - start < 30
    assert_error(out, 3, str(bomb))
    for argv in (["diff", str(bomb), str(good)], ["diff", str(good), str(bomb)]):
        assert_error(_run_cli_env(*argv, timeout=60, **limits), 3, str(bomb))
    out = _run_cli_env("diff", str(good), str(good), "--json", timeout=60, **limits)
    assert out.returncode == 0 and json.loads(out.stdout)["counts"]["identical"] == 1


def test_cli_parse_limits_apply_and_a_crashed_parser_is_one_line(tmp_path):
    good = f.save_torch({"w": torch.ones(3)}, tmp_path / "good.pt")
    for memory in ("1000000", "16000000"):  # the child cannot even start / cannot import the readers
        out = _run_cli_env("inspect", str(good), "--no-stats", CKPTSCOPE_PARSE_MEMORY_BYTES=memory)
        assert_error(out, 3, str(good))
    out = _run_cli_env("inspect", str(good), "--no-stats", CKPTSCOPE_PARSE_TIMEOUT_S="0")
    assert_error(out, 2, "CKPTSCOPE_PARSE_TIMEOUT_S")


def test_cli_reads_a_sharded_set_beside_its_index(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((2, 2), float(i)) for i in range(4)}
    index = f.sharded_safetensors(tmp_path, tensors)
    out = run_cli("inspect", str(index), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["tensor_count"] == 4
    assert {t["name"]: t["stats"]["mean"] for t in data["tensors"]} == {n: t.mean().item() for n, t in tensors.items()}


def test_cli_output_that_cannot_be_written_is_one_line(tmp_path):
    good = f.save_torch({"w": torch.ones(3)}, tmp_path / "good.pt")
    out = run_cli("export", str(good), "-o", str(tmp_path / "no" / "such" / "dir.pt"))
    assert_error(out, 4, "cannot write", "No such file")
