"""The Dockerfile installs the way CI does, and everything it copies exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_uses_the_ci_install_path_and_service_settings():
    text = (ROOT / "Dockerfile").read_text()
    assert "RUN bash scripts/setup.sh --runtime" in text  # the command scripts/smoke-install.sh runs in CI
    assert text.count("FROM python:3.11-slim") == 2  # two stages
    assert re.search(r"^USER ckptscope$", text, re.M)
    assert 'VOLUME ["/data"]' in text and "EXPOSE 8000" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["ckptscope", "serve", "--host", "0.0.0.0"]' in text
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for source in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / source).exists(), source
    assert "setup.py" in text  # it builds the stats kernel


def test_ci_runs_the_readme_test_command_and_the_install_smoke():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in ci and "bash scripts/test.sh" in readme
    assert "bash scripts/smoke-install.sh" in ci
    assert "CKPTSCOPE_POSTGRES=required bash scripts/test.sh" in ci  # the PostgreSQL pass cannot be skipped
    assert "scripts/with-postgres.sh" in (ROOT / "scripts" / "test.sh").read_text()
    assert (
        'CKPTSCOPE_VENV="$scratch/venv" bash scripts/setup.sh --runtime'
        in (ROOT / "scripts" / "smoke-install.sh").read_text()
    )


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "data", "bench-data", ".git"):
        assert entry in ignored
