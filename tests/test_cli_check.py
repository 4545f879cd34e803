"""``ckptscope check`` as CI runs it: a real subprocess on real files, exit 0 / 1 / 2 / 3, JSON and JUnit."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_cli_conventions import assert_error

LAYER = "model.layers.1"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "check", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, int]:
    """(a fresh tiny Llama saved by ``save_pretrained``, the same with only ``model.layers.1``
    changed saved by ``save_file``, its parameter count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("check")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory / "base", safe_serialization=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for name in state:
        if name.startswith(LAYER + "."):
            state[name] = state[name] + 0.01 * torch.randn_like(state[name])  # "fine-tuned" layer 1 only
    tuned = directory / "tuned.safetensors"
    save_file(state, str(tuned))
    return directory / "base" / "model.safetensors", tuned, sum(v.numel() for v in state.values())


def junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return {case.get("name", ""): case for case in root.iter("testcase")}


def test_all_rules_pass_exit_0_with_junit(llama, tmp_path):
    base, tuned, params = llama
    junit = tmp_path / "reports" / "check.xml"  # the folder is made
    rules = [
        f"changed-only={LAYER}",
        "unchanged=model.embed_tokens,model.layers.0,lm_head",
        "no-nan",
        "no-inf",
        "max-abs<=100",
        f"params=={params}",
        "dtype==f32",
    ]
    out = run_cli(str(tuned), "--baseline", str(base), *(f"--rule={r}" for r in rules), "--junit", str(junit))
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.count("PASS") == len(rules) and "7 passed, 0 failed" in out.stdout
    cases = junit_cases(junit)
    assert set(cases) == set(rules)
    assert not [c for c in cases.values() if c.find("failure") is not None]
    assert [p.name for p in junit.parent.iterdir()] == ["check.xml"]  # written atomically: no temp file left


def test_failing_rules_exit_1_and_name_the_offenders(llama, tmp_path):
    base, tuned, params = llama
    junit = tmp_path / "check.xml"
    out = run_cli(
        str(tuned),
        "--baseline",
        str(base),
        "--rule=changed-only=model.layers.0",
        "--rule=unchanged=model.layers",
        "--rule=no-nan",
        f"--rule=params>={params + 1}",
        "--rule=dtype==bf16@model.norm",
        "--json",
        "--junit",
        str(junit),
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    report = json.loads(out.stdout)
    assert report["passed"] is False
    by = {r["rule"]: r for r in report["results"]}
    changed = set(by["changed-only=model.layers.0"]["offenders"])
    assert changed and all(n.startswith(LAYER + ".") for n in changed)
    assert f"{LAYER}.self_attn.q_proj.weight" in changed
    assert by["changed-only=model.layers.0"]["offender_count"] == len(changed)
    assert set(by["unchanged=model.layers"]["offenders"]) == changed
    assert by["no-nan"]["passed"] is True
    assert (
        by[f"params>={params + 1}"]["passed"] is False
        and f"{params:,} parameters" in by[f"params>={params + 1}"]["detail"]
    )
    assert by["dtype==bf16@model.norm"]["offenders"] == ["model.norm.weight"]
    cases = junit_cases(junit)
    failure = cases["changed-only=model.layers.0"].find("failure")
    assert failure is not None and f"{LAYER}.self_attn.q_proj.weight" in (failure.text or "")
    assert cases["no-nan"].find("failure") is None
    root = ET.parse(junit).getroot()
    assert root.get("tests") == "5" and root.get("failures") == "4"


def test_nan_offenders_in_text_and_escaped_in_junit(tmp_path):
    hostile = 'evil<b>&"\x1b[31m.weight'
    path = tmp_path / "nan.safetensors"
    save_file({"ok.weight": torch.ones(4, 4), hostile: torch.tensor([1.0, float("nan"), float("inf")])}, str(path))
    rules = tmp_path / "gate.rules"
    rules.write_text("# the gate\n\nno-nan   # never\nno-inf\nmax-abs<=10@ok\nno-findings>=error\n")
    junit = tmp_path / "out.xml"
    out = run_cli(str(path), "--rules", str(rules), "--junit", str(junit))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "\x1b" not in out.stdout and 'evil<b>&"\\x1b[31m.weight' in out.stdout
    assert (
        "FAIL  no-nan" in out.stdout
        and "PASS  max-abs<=10@ok" in out.stdout
        and "FAIL  no-findings>=error" in out.stdout
    )
    cases = junit_cases(junit)
    assert set(cases) == {"no-nan", "no-inf", "max-abs<=10@ok", "no-findings>=error"}
    text = cases["no-nan"].find("failure").text or ""
    assert 'evil<b>&"\\x1b[31m.weight' in text  # parsed back: escaped on the way in, intact on the way out


def test_unreadable_files_exit_3_and_usage_errors_exit_2_with_one_line(llama, tmp_path):
    base, tuned, _ = llama
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert_error(run_cli(str(garbage), "--rule", "no-nan"), 3, str(garbage))  # issue 16: 3, not 2
    assert_error(run_cli(str(tuned), "--baseline", str(tmp_path / "missing.pt"), "--rule", "unchanged=lm_head"), 3)
    assert_error(run_cli(str(tuned), "--rule", "max-abs<=lots"), 2, "max-abs<=lots", "not a number")
    assert_error(run_cli(str(tuned), "--rule", "unchanged=lm_head"), 2, "baseline")
    assert_error(run_cli(str(tuned)), 2, "no rules")
    assert_error(run_cli(str(tuned), "--rules", str(tmp_path / "none.rules")), 3, "none.rules")


def test_no_untrained_flags_a_fresh_model(llama):
    base, _, _ = llama
    out = run_cli(str(base), "--rule", "no-untrained@model.layers", "--json")
    assert out.returncode == 1, (out.stdout, out.stderr)
    (result,) = json.loads(out.stdout)["results"]
    assert result["passed"] is False and f"{LAYER}.mlp.up_proj.weight" in result["offenders"]
