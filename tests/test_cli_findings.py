"""``ckptscope findings`` and the insights in ``inspect --json``, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests import factories as f
from tests.services.test_insights import EXPECTED, NAN, SCALED, ZEROED, broken_llama


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    return broken_llama(tmp_path_factory.mktemp("llama"))


def test_findings_one_line_each_and_json(llama_file):
    out = run_cli("findings", str(llama_file))
    assert out.returncode == 1, out.stderr  # findings reported
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    got = {(line.split()[2].rstrip(":"), line.split()[1]) for line in lines}
    assert got == EXPECTED
    assert next(line for line in lines if NAN in line).startswith("error")
    assert "3 findings (1 error, 2 warning)" in out.stderr

    out = run_cli("findings", str(llama_file), "--json")
    assert out.returncode == 1, out.stderr
    data = json.loads(out.stdout)
    assert {(x["target"], x["rule"]) for x in data["findings"]} == EXPECTED
    assert data["root"] == "" and data["modules"][""]["findings"]["error"] == 1
    assert data["thresholds"]["variance_exploding"] == 10.0


def test_inspect_json_has_init_and_findings(llama_file):
    out = run_cli("inspect", str(llama_file), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {(x["target"], x["rule"]) for x in data["findings"]} == EXPECTED
    by = {t["name"]: t for t in data["tensors"]}
    assert by["model.layers.0.mlp.up_proj.weight"]["init"]["verdict"] == "init"
    assert by[ZEROED]["init"]["matches"] and by[SCALED]["init"]["verdict"] != "init"
    out = run_cli("inspect", str(llama_file), "--json", "--no-stats")
    data = json.loads(out.stdout)
    assert data["findings"] == [] and all(t["init"] is None for t in data["tensors"])


def test_findings_clean_file_thresholds_file_and_bad_input(tmp_path):
    path = f.save_torch({"a.0.weight": torch.ones(4, 4), "b": torch.zeros(8, 8)}, tmp_path / "m.pt")
    out = run_cli("findings", str(path))
    assert out.returncode == 1, out.stderr  # one finding
    [line] = out.stdout.splitlines()  # the all-zero matrix only
    assert line.split()[:3] == ["warning", "dead", "b:"]
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"near_zero": 0.5}))
    out = run_cli("findings", str(path), env={"CKPTSCOPE_FINDINGS_THRESHOLDS": str(thresholds)})
    assert out.returncode == 2 and "CKPTSCOPE_FINDINGS_THRESHOLDS" in out.stderr and "near_zero" in out.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = run_cli("findings", str(bad))
    assert out.returncode == 3 and out.stderr.startswith("ckptscope: ")  # unreadable input
