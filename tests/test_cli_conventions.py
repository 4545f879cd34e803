"""The command line's conventions, on the real entry point in subprocesses: one exit status per
meaning for every command (0 ok, 1 findings/differences/failed rules, 2 usage, 3 unreadable
input, 4 I/O error, 141 a closed stdout), results on stdout and nothing else, one ``ckptscope:``
line on stderr for every error (``--json`` or not), ``--version``, shell completion, a progress
bar only on a terminal's stderr, and start-up without torch where nothing needs it."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptscope import __version__
from ckptscope.cli import build_parser
from tests import factories as f

CLI = [sys.executable, "-m", "ckptscope.cli"]


def run(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once (each is a process of its own), results in order."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda args: run(*args), commands))


def assert_error(out: subprocess.CompletedProcess[str], status: int, *fragments: str) -> None:
    """A failure as the conventions want it: ``status``, nothing on stdout, stderr ending in one
    ``ckptscope:`` line (argparse's usage lines may come before it), no traceback."""
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "", out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.endswith("\n"), out.stderr
    lines = out.stderr.splitlines()
    last = lines[-1]
    assert last.startswith("ckptscope: "), out.stderr
    assert len(lines) == 1 or (status == 2 and lines[0].startswith("usage: ")), out.stderr  # argparse: usage first
    for fragment in fragments:
        assert fragment in last, out.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("conventions")
    torch.manual_seed(0)
    base = {"enc.weight": torch.randn(8, 8), "enc.bias": torch.randn(8), "head.weight": torch.randn(4, 8)}
    junk = d / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a checkpoint" * 8)
    return {
        "a": f.save_torch(base, d / "a.pt"),
        "a_safe": f.save_safetensors(base, d / "a.safetensors"),  # the same tensors, another format
        "values": f.save_safetensors({**base, "head.weight": base["head.weight"] + 1}, d / "values.safetensors"),
        "dtype": f.save_torch({**base, "enc.bias": base["enc.bias"].double()}, d / "dtype.pt"),
        "extra": f.save_torch({**base, "new.weight": torch.ones(2)}, d / "extra.pt"),
        "dead": f.save_torch({"dead.weight": torch.zeros(8, 8)}, d / "dead.pt"),  # a finding: all zeros
        "many": f.save_torch({f"layer{i}.weight": torch.zeros(2) for i in range(3000)}, d / "many.pt"),
        "junk": junk,
    }


# --- version, help, completion, start-up -----------------------------------------------------


def test_version_is_one_line_on_stdout():
    out = run("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"ckptscope {__version__}\n", "")


def test_help_documents_the_exit_statuses():
    for args in (["--help"], ["check", "--help"], ["diff", "--help"]):
        out = run(*args)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        text = re.sub(r"\s+", " ", out.stdout)
        for line in (
            "0 ok",
            "1 findings reported, checkpoints differ, a rule failed",
            "2 usage",
            "3 unreadable input",
            "4 I/O error",
            "141 stdout closed",
        ):
            assert line in text, (args, out.stdout)


def test_every_command_that_prints_a_report_has_json():
    """A guard for commands to come: only those that write a file or run something may lack it."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    without = {
        name
        for name, command in sub.choices.items()  # type: ignore[union-attr]
        if not any("--json" in a.option_strings for a in command._actions)
    }
    assert without == {"serve", "completion"}


def test_commands_that_write_files_say_what_they_wrote_in_json(files, tmp_path):
    a = str(files["a"])
    export, preview = run_all(
        ["export", a, "--include", "enc", "-o", str(tmp_path / "enc.safetensors"), "--json"],
        ["preview", a, "enc.weight", "-o", str(tmp_path / "w.png"), "--json"],
    )
    migrate = run("migrate", "--json", env={**os.environ, "CKPTSCOPE_DATA_DIR": str(tmp_path / "data")})
    for out in (export, preview, migrate):
        assert out.returncode == 0 and out.stderr == "", (out.stdout, out.stderr)
    wrote = json.loads(export.stdout)
    assert wrote["tensors"] == 2 and wrote["format"] == "safetensors" and wrote["dequantized"] is None
    assert wrote["bytes"] == (tmp_path / "enc.safetensors").stat().st_size
    drawn = json.loads(preview.stdout)
    png = (tmp_path / "w.png").read_bytes()
    assert png[:4] == b"\x89PNG" and (drawn["width"], drawn["height"]) == struct.unpack(">II", png[16:24])  # IHDR
    assert json.loads(migrate.stdout)["revision"]


def _imports_torch(stderr: str) -> bool:
    """Whether ``-X importtime`` output lists torch (top level or imported by another module)."""
    return any(re.search(r"\|\s+torch$", line) for line in stderr.splitlines())


def test_startup_paths_do_not_import_torch(files):
    # the detector, on the lines -X importtime writes for torch imported directly and from a module
    assert _imports_torch("import time:     52516 |    2366168 | torch\n")
    assert _imports_torch("import time:     52516 |    2366168 |     torch\nimport time: 2 | 3 | ckptscope.x\n")
    assert not _imports_torch("import time:       123 |        456 |   torchvision\n")
    for args in (
        ["--help"],
        ["--version"],
        ["completion", "bash"],
        ["inspect", "--no-stats", str(files["a"])],
        ["inspect", "--no-stats", "--json", str(files["a_safe"])],
    ):
        out = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args], capture_output=True, text=True)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        assert "ckptscope.cli" in out.stderr  # it is the importtime output of the command
        assert not _imports_torch(out.stderr), args


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_commands_and_options(tmp_path):
    out = run("completion", "bash")
    assert out.returncode == 0 and out.stderr == ""
    script = tmp_path / "ckptscope.bash"
    script.write_text(out.stdout)
    probe = f"""
source {script}
spec=$(complete -p ckptscope) || exit 9
fn=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<<"$spec")
complete_words() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}};
  COMPREPLY=(); "$fn" ckptscope "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"; echo "${{COMPREPLY[*]}}"; }}
complete_words ckptscope ins
complete_words ckptscope inspect --no
complete_words ckptscope completion ''
"""
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["inspect", "--no-stats", "bash zsh tcsh"], done.stdout


def test_zsh_and_tcsh_completion_scripts():
    zsh, tcsh = run("completion", "zsh"), run("completion", "tcsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef ckptscope") and "inspect" in zsh.stdout
    assert tcsh.returncode == 0 and "complete ckptscope" in tcsh.stdout and "inspect" in tcsh.stdout
    assert_error(run("completion", "fish"), 2, "completion", "invalid choice: 'fish'")


# --- exit statuses and one-line errors --------------------------------------------------------


def test_usage_errors_exit_2(files):
    a = str(files["a"])
    outs = run_all(
        ["inspect"],
        ["serve", "--port", "eighty"],
        ["diff", a],
        ["no-such-command"],
        ["check", a, "--rule", "max-abs<=lots", "--json"],
        ["inspect", a, "--root", "nope", "--json", "--no-stats"],
    )
    assert_error(outs[0], 2, "inspect", "required: path")
    assert_error(outs[1], 2, "serve", "invalid int value")
    assert_error(outs[2], 2, "diff", "required: b")
    assert_error(outs[3], 2, "invalid choice")
    assert_error(outs[4], 2, "not a number")
    assert_error(outs[5], 2, "no root 'nope'")


def test_unreadable_inputs_exit_3(files, tmp_path):
    missing, junk, rules = str(tmp_path / "missing.pt"), str(files["junk"]), str(tmp_path / "none.rules")
    outs = run_all(
        ["inspect", missing, "--json"],
        ["inspect", junk, "--no-stats"],
        ["diff", str(files["a"]), junk, "--json"],
        ["check", str(files["a"]), "--rules", rules, "--json"],
    )
    assert_error(outs[0], 3, missing, "No such file")
    assert_error(outs[1], 3, junk, "unrecognised file")
    assert_error(outs[2], 3, junk)
    assert_error(outs[3], 3, rules)  # issue 15 had exit 2 here


def test_an_output_that_cannot_be_written_exits_4_and_leaves_nothing(files, tmp_path):
    a = str(files["a"])
    target = tmp_path / "no" / "such" / "x.safetensors"
    junit = files["a"] / "reports" / "check.xml"  # under a regular file
    outs = run_all(
        ["export", a, "-o", str(target)],
        ["export", a, "-o", str(files["a"] / "x.pt")],
        ["check", a, "--rule", "no-nan", "--junit", str(junit)],
    )
    assert_error(outs[0], 4, f"cannot write {target}", "No such file")
    assert_error(outs[1], 4, "cannot write", "Not a directory")
    assert_error(outs[2], 4, f"cannot write {junit}")

    # a full disk, as the kernel reports it for a file size limit (EFBIG) in the middle of the write
    out_dir = tmp_path / "full"
    out_dir.mkdir()
    big = f.save_torch({"w": torch.randn(64, 1024)}, tmp_path / "big.pt")  # 256 KiB of tensor data

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = run("export", str(big), "-o", str(out_dir / "w.safetensors"), preexec_fn=limit_file_size)
    assert_error(out, 4, f"cannot write {out_dir / 'w.safetensors'}", "File too large")
    assert list(out_dir.iterdir()) == []  # neither the output nor its temporary file


def test_diff_exits_1_when_the_checkpoints_differ(files):
    a = str(files["a"])
    same, values, dtype, extra = run_all(
        ["diff", a, str(files["a_safe"]), "--json"],  # the same tensors, in another format
        ["diff", a, str(files["values"]), "--json"],
        ["diff", a, str(files["dtype"]), "--json"],  # enc.bias as float64: another dtype, the same values
        ["diff", a, str(files["extra"])],  # one more tensor in B; text, not JSON
    )
    assert same.returncode == 0 and same.stderr == "", same.stderr
    assert json.loads(same.stdout)["counts"]["identical"] == 3
    for out, status in ((values, "changed"), (dtype, "dtype_changed")):
        assert out.returncode == 1 and out.stderr == "", (status, out.stderr)
        assert json.loads(out.stdout)["counts"][status] == 1, status
    assert extra.returncode == 1 and extra.stderr == "" and "only_b  new.weight" in extra.stdout, extra.stdout


def test_findings_exit_1_when_there_are_findings(files):
    clean, found = run_all(["findings", str(files["a"]), "--json"], ["findings", str(files["dead"])])
    assert clean.returncode == 0 and json.loads(clean.stdout)["findings"] == [], clean.stdout
    assert found.returncode == 1 and found.stdout.split()[:3] == ["warning", "dead", "dead.weight:"], found.stdout
    assert found.stderr == "1 findings (1 warning)\n"  # the summary: stderr, so stdout stays the list


def test_json_on_every_report_command(files, tmp_path):
    a = str(files["a"])
    commands = {  # (diff and findings: above; spectrum: tests/insights/test_spectrum.py)
        "inspect": (["inspect", a, "--json", "--no-stats"], 0),
        "copy": (["copy", a, str(files["values"]), "--map", "enc=enc", "--dry-run", "--json"], 0),
        "freeze": (["freeze", a, "--freeze", "enc", "--json"], 0),
        "check": (["check", a, "--rule", "dtype==f16", "--json"], 1),
    }
    outs = run_all(*(args for args, _ in commands.values()))
    for (name, (_, status)), out in zip(commands.items(), outs, strict=True):
        assert out.returncode == status and out.stderr == "", (name, out.returncode, out.stderr)
        assert out.stdout.count("\n") == 1 and isinstance(json.loads(out.stdout), dict), name


# --- pipes and terminals ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "table"])
def test_a_closed_stdout_ends_quietly_with_141(files, fmt):
    """`ckptscope inspect ... | head`: the reader leaves after a few bytes of a large result."""
    args = ["inspect", str(files["many"]), "--no-stats", *(["--json"] if fmt == "json" else [])]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(16)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert head and err == b""  # no traceback, no "Exception ignored", no message at all


def _run_with_stderr_on_a_terminal(args: list[str]) -> tuple[int, str, bytes]:
    master, slave = os.openpty()
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal must be read while the command runs, or its writes block
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer has gone
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    status = proc.wait(timeout=120)
    reader.join(timeout=30)
    os.close(master)
    return status, out, b"".join(chunks)


def test_progress_bar_only_on_a_terminal_stderr(files):
    args = ["inspect", str(files["many"]), "--json"]
    status, out, terminal = _run_with_stderr_on_a_terminal(args)
    assert status == 0 and "\x1b" not in out and json.loads(out)["tensor_count"] == 3000
    assert b"stats" in terminal and b"\x1b[" in terminal, terminal[:500]  # the bar, drawn on the terminal
    piped = run(*args)
    assert piped.returncode == 0 and piped.stderr == ""  # stderr a pipe: no bar, nothing at all
    assert json.loads(piped.stdout)["tensor_count"] == 3000
