"""Start-up paths import only what they need: ``ckptscope --help`` is argparse and the CLI's own
modules (no FastAPI, SQLAlchemy, numpy, torch, pydantic, rich); creating the web app imports no
torch (it is imported lazily, where a GPU or spectrum asks for it). Each check runs in a fresh
interpreter and reads its ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY_FOR_HELP = ("torch", "numpy", "fastapi", "starlette", "sqlalchemy", "uvicorn", "pydantic", "rich", "jinja2")


def _modules_after(code: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; the modules it had imported, and what it printed."""
    probe = code + "\nimport json as _j, sys as _s\nprint('MODULES' + _j.dumps(sorted(_s.modules)))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    printed, _, modules = done.stdout.rpartition("MODULES")
    return json.loads(modules), printed


def _top_level(modules: list[str]) -> set[str]:
    return {m.partition(".")[0] for m in modules}


def test_help_imports_no_heavy_module():
    modules, printed = _modules_after(
        "from ckptscope.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0"
    )
    assert "usage: ckptscope" in printed and "inspect" in printed  # it is the help that ran
    assert _top_level(modules).isdisjoint(HEAVY_FOR_HELP), sorted(_top_level(modules) & set(HEAVY_FOR_HELP))
    assert "ckptscope.formats" not in modules and "ckptscope.stats" not in modules


def test_each_command_help_imports_no_heavy_module():
    modules, printed = _modules_after(
        "from ckptscope.cli import main\n"
        "for command in ('inspect', 'serve', 'export', 'check'):\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0"
    )
    assert "--no-stats" in printed and "--port" in printed
    assert _top_level(modules).isdisjoint(HEAVY_FOR_HELP)


def test_creating_the_app_imports_no_torch(tmp_path):
    code = (
        "from pathlib import Path\n"
        "from ckptscope.config import Settings\n"
        "from ckptscope.main import create_app\n"
        f"app = create_app(Settings(data_dir=Path({str(tmp_path / 'data')!r})))\n"
        "assert app.routes\n"
        "import sys\n"
        "torch = sys.modules.get('torch')\n"
        "print('IMPORTERS', [n for n, m in list(sys.modules.items())\n"
        "    if n.startswith('ckptscope.') and torch is not None and any(v is torch for v in vars(m).values())])\n"
    )
    modules, printed = _modules_after(code)
    assert "fastapi" in _top_level(modules)  # the app was made
    assert "torch" not in _top_level(modules), printed.strip()  # names the ckptscope modules importing it


# --- a listing: ``inspect --json --no-stats`` of a safetensors file ---------------------------------

READERS = (
    "ckptscope.formats.dcp",
    "ckptscope.formats.folder",
    "ckptscope.formats.gguf_format",
    "ckptscope.formats.safetensors_format",
    "ckptscope.formats.sharded",
    "ckptscope.formats.torch_legacy",
    "ckptscope.formats.torch_zip",
    "ckptscope.formats.torch_pickle",
    "ckptscope.formats.pickled_tree",
)
HEAVY_FOR_LISTING = ("torch", "numpy", "pydantic", "pydantic_settings", "fastapi", "sqlalchemy", "rich", "safetensors")


def _safetensors_file(path, count: int = 40):
    """A safetensors file of ``count`` float32 tensors, written by hand (no library in the probe)."""
    import struct

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in range(count):
        name = f"layers.{i // 4}.unit{i % 4}.weight"
        header[name] = {"dtype": "F32", "shape": [4, 8], "data_offsets": [offset, offset + 128]}
        offset += 128
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def _child_env() -> dict[str, str]:
    import os

    from ckptscope.formats.sandbox import PROJECT_ROOT

    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(PROJECT_ROOT), "LANG": "C.UTF-8"}


def _child_imports(path) -> tuple[set[str], dict]:
    """The modules the sandboxed child (as ``run_sandboxed`` starts it) imported to list ``path``,
    read from ``-X importtime``, and its answer."""
    from ckptscope.formats.sandbox import PROJECT_ROOT

    request = {"path": str(path), "name": None, "shards": None, "folder": False}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ckptscope.formats.sandbox"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        env=_child_env(),
        cwd=str(PROJECT_ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return imported, json.loads(done.stdout)


def test_inspect_no_stats_imports_neither_pydantic_nor_torch_nor_a_reader(tmp_path):
    """The CLI lists the file in the sandboxed child: it imports no reader itself, and with no
    CKPTSCOPE_* variable set, no pydantic either (the settings are their defaults)."""
    import os

    path = _safetensors_file(tmp_path / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CKPTSCOPE_")}
    modules, printed = _modules_after(
        "import contextlib, io\n"
        "from ckptscope.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    assert main(['inspect', '--json', '--no-stats', {str(path)!r}]) == 0\n"
        "print('TENSORS', __import__('json').loads(out.getvalue())['tensor_count'])\n",
        env=env,
    )
    assert "TENSORS 40" in printed  # it is the listing that ran
    assert _top_level(modules).isdisjoint(HEAVY_FOR_LISTING), sorted(_top_level(modules) & set(HEAVY_FOR_LISTING))
    assert not set(modules) & set(READERS), sorted(set(modules) & set(READERS))


def test_the_sandboxed_child_imports_only_the_sniffed_reader(tmp_path):
    imported, answer = _child_imports(_safetensors_file(tmp_path / "model.safetensors"))
    assert answer["ok"] and len(answer["checkpoint"]["tensors"]) == 40
    assert "ckptscope.formats.safetensors_format" in imported
    assert not imported & (set(READERS) - {"ckptscope.formats.safetensors_format"}), sorted(imported & set(READERS))
    assert _top_level(sorted(imported)).isdisjoint(HEAVY_FOR_LISTING + ("logging", "subprocess"))


def test_the_sandboxed_child_imports_the_readers_a_pickle_or_a_directory_needs(tmp_path):
    """A torch zip needs torch_zip.py; a legacy pickle may be a DCP .metadata (dcp.py too); a
    directory may hold files of any kind: every reader. All imported before the audit hook is
    armed (an import after it would be a blocked_operation)."""
    import torch

    torch.save({"w": torch.ones(2, 3)}, tmp_path / "zip.pt")
    imported, answer = _child_imports(tmp_path / "zip.pt")
    assert answer["ok"], answer
    assert "ckptscope.formats.torch_zip" in imported
    assert not imported & {f"ckptscope.formats.{m}" for m in ("dcp", "folder", "gguf_format", "safetensors_format")}
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    imported, answer = _child_imports(tmp_path / "legacy.pt")
    assert answer["ok"], answer
    assert {"ckptscope.formats.torch_legacy", "ckptscope.formats.dcp"} <= imported
    assert not imported & {"ckptscope.formats.safetensors_format", "ckptscope.formats.gguf_format"}
    folder = tmp_path / "folder"
    folder.mkdir()
    _safetensors_file(folder / "model.safetensors")
    imported, answer = _child_imports(folder)
    assert answer["ok"], answer
    assert set(READERS) <= imported


def test_every_reader_name_is_still_a_name_of_the_package():
    import pytest

    import ckptscope.formats as formats
    from ckptscope.formats import ShardResolver, read_safetensors  # noqa: F401

    names = ("read_dcp", "read_dcp_directory", "is_dcp_metadata", "directory_resolver", "read_directory")
    names += ("read_folder", "read_gguf", "read_sharded", "read_torch_legacy", "read_torch_zip", "open_checkpoint")
    for name in names:
        assert callable(getattr(formats, name)), name
    assert read_safetensors.__module__ == "ckptscope.formats.safetensors_format"
    with pytest.raises(AttributeError):
        formats.no_such_reader  # noqa: B018


def test_command_settings_are_the_validated_defaults_without_pydantic():
    """With no CKPTSCOPE_* variable set, ``command_settings`` holds what ``Settings()`` holds (the
    defaults, checked as it checks them: data_dir absolute), without importing pydantic."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CKPTSCOPE_")}
    code = (
        "import sys\n"
        "from ckptscope.config import SettingsFields, command_settings\n"
        "light = command_settings()\n"
        "assert not {m.partition('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_settings'}\n"
        "from ckptscope.config import Settings\n"
        "full = Settings()\n"
        "assert type(light) is SettingsFields and set(SettingsFields.__annotations__) == set(Settings.model_fields)\n"
        "for name in Settings.model_fields:\n"
        "    assert getattr(light, name) == getattr(full, name), name\n"
        "assert light.data_dir.is_absolute() and light.parse_limits == full.parse_limits\n"
        "assert light.findings_threshold_values == full.findings_threshold_values\n"
        "print('SAME')\n"
    )
    _, printed = _modules_after(code, env=env)
    assert "SAME" in printed


def test_command_settings_with_a_variable_set_is_the_validated_settings(monkeypatch):
    import pydantic
    import pytest

    from ckptscope.config import Settings, command_settings

    monkeypatch.setenv("CKPTSCOPE_PARSE_CPU_SECONDS", "7")
    settings = command_settings()
    assert isinstance(settings, Settings) and settings.parse_limits.cpu_seconds == 7
    monkeypatch.setenv("ckptscope_port", "99999")  # names are not case-sensitive, as Settings reads them
    with pytest.raises(pydantic.ValidationError) as raised:
        command_settings()
    assert raised.value.errors()[0]["loc"] == ("port",)


def test_the_child_reads_the_parents_bytecode_cache_and_writes_none(tmp_path, monkeypatch):
    """PYTHONPYCACHEPREFIX (bench/startup.py's bytecode cache) reaches the child as an absolute
    path; the child still writes no bytecode; without a prefix, none is passed."""
    import pytest

    import ckptscope.formats.sandbox as sandbox
    from ckptscope.errors import CheckpointError

    seen: list[dict[str, str]] = []

    def fake_run(argv, **kwargs):
        seen.append(kwargs["env"])
        raise subprocess.TimeoutExpired(argv, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    limits = sandbox.Limits(1 << 30, 5, 5.0)
    for prefix in ("relative-cache", None):
        monkeypatch.setattr(sys, "pycache_prefix", prefix)
        with pytest.raises(CheckpointError):
            sandbox.run_sandboxed({"path": "x"}, limits, "x")
    assert seen[0]["PYTHONPYCACHEPREFIX"] == str(tmp_path / "relative-cache")
    assert "PYTHONPYCACHEPREFIX" not in seen[1]
    assert seen[0]["PYTHONDONTWRITEBYTECODE"] == seen[1]["PYTHONDONTWRITEBYTECODE"] == "1"
