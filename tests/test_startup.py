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
