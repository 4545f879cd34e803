"""One error hierarchy, mapped once: every ckptscope error becomes problem+json (or a readable
page) with its code and status; user mistakes that used to leak as KeyError/ValueError are 4xx."""

from __future__ import annotations

import html
import subprocess
import sys

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ckptscope import errors
from ckptscope.config import Settings
from ckptscope.http import problems
from ckptscope.insights.preview import PreviewError
from ckptscope.insights.rules import RuleError
from ckptscope.insights.spectrum import SpectrumError
from ckptscope.metrics import Metrics
from ckptscope.services.check import StatsNotReady
from ckptscope.services.identity import CopyNotVerified, CopyVerification
from ckptscope.web.templating import RENDERER
from tests import factories as f
from tests.helpers import upload, wait_stats


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


ERRORS = {
    errors.CkptscopeError: lambda: errors.CkptscopeError("plain"),
    errors.CheckpointError: lambda: errors.CheckpointError("corrupt", "bad bytes"),
    errors.NotFound: lambda: errors.NotFound("no such thing"),
    errors.UnknownRoot: lambda: errors.UnknownRoot("no root 'x'"),
    errors.Invalid: lambda: errors.Invalid("wrong"),
    errors.UnsupportedOutput: lambda: errors.UnsupportedOutput("cannot store"),
    errors.TooLarge: lambda: errors.TooLarge(10),
    RuleError: lambda: RuleError("bad rule 'nan-ish': unknown"),
    PreviewError: lambda: PreviewError("a 0-d tensor has no preview"),
    SpectrumError: lambda: SpectrumError("a 1-d tensor has no spectrum"),
    StatsNotReady: lambda: StatsNotReady("statistics are still being computed"),
    CopyNotVerified: lambda: CopyNotVerified(
        CopyVerification(mismatched=[{"target": "w", "source": "w", "expected": "x", "written": "y"}])
    ),
    errors.Forbidden: lambda: errors.Forbidden("outside the configured roots (CKPTSCOPE_SOURCE_ROOTS)"),
    errors.SourceError: lambda: errors.SourceError("the store could not serve it"),
    errors.SourceNotFound: lambda: errors.SourceNotFound("s3://b/k does not exist"),
    errors.SourceDenied: lambda: errors.SourceDenied("access denied: check AWS_ACCESS_KEY_ID"),
    errors.SourceUnreachable: lambda: errors.SourceUnreachable("the endpoint 127.0.0.1:9 did not answer"),
    errors.SourceChanged: lambda: errors.SourceChanged("s3://b/k changed since it was listed"),
}
UPSTREAM = {errors.SourceUnreachable}  # the one error that is not the client's: a store that did not answer


def test_every_error_class_is_covered_here():
    assert set(_subclasses(errors.CkptscopeError)) | {errors.CkptscopeError} == set(ERRORS)


@pytest.mark.parametrize("cls", list(ERRORS), ids=lambda c: c.__name__)
def test_each_error_maps_to_its_status_and_code_on_api_and_page(cls):
    app = FastAPI()
    app.state.html = RENDERER
    app.state.core = type("CoreStub", (), {"metrics": Metrics()})()
    problems.install(app)
    exc = ERRORS[cls]()

    @app.get("/api/v1/boom")
    @app.get("/boom")
    def boom() -> None:
        raise exc

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/api/v1/boom")
        assert r.status_code == cls.status and (
            400 <= r.status_code < 500 or (cls in UPSTREAM and r.status_code == 502)
        )
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["code"] == exc.code and body["type"] == f"/problems/{exc.code}"
        assert body["detail"] == exc.detail and "Traceback" not in r.text
        page = client.get("/boom")
        assert page.status_code == cls.status and page.headers["content-type"].startswith("text/html")
        assert exc.detail.split(":")[0] in html.unescape(page.text)


def test_complex_tensor_export_to_safetensors_is_422_not_500(client, tmp_path):
    path = tmp_path / "complex.pt"
    torch.save({"c": torch.randn(3, dtype=torch.complex128), "w": torch.randn(4)}, path)
    ckpt = upload(client, path).json()
    wait_stats(client, ckpt["id"])
    r = client.post(f"/api/v1/checkpoints/{ckpt['id']}/export", json={"format": "safetensors"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unsupported_output" and "complex128" in r.json()["detail"]
    assert client.get("/api/v1/checkpoints").json()["total"] == 1  # nothing registered
    ok = client.post(f"/api/v1/checkpoints/{ckpt['id']}/export", json={"format": "pt"})
    assert ok.status_code == 201, ok.text


def test_unknown_root_is_404_unknown_root_on_every_route(client, tmp_path):
    ckpt = upload(client, f.save_torch({"w": torch.randn(2)}, tmp_path / "flat.pt")).json()
    for path in ("tree", "tensors", "tensors/w"):
        r = client.get(f"/api/v1/checkpoints/{ckpt['id']}/{path}?root=nope")
        assert r.status_code == 404 and r.json()["code"] == "unknown_root", (path, r.text)
    r = client.post(f"/api/v1/checkpoints/{ckpt['id']}/freeze-plan", json={"freeze": ["w"], "root": "nope"})
    assert r.status_code == 404 and r.json()["code"] == "unknown_root"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, timeout=120, env=full
    )


def test_cli_unknown_root_and_unstorable_export_are_one_line(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"c": torch.randn(3, dtype=torch.complex128)}, path)
    r = _cli("inspect", str(path), "--root", "nope", "--no-stats")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no root 'nope'" in r.stderr, r.stderr
    out = tmp_path / "out.safetensors"
    r = _cli("export", str(path), "-o", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "complex128" in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))  # nothing half-written


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STATS_WORKERS", "0"),
        ("JOB_STALE_S", "0"),
        ("PARSE_TIMEOUT_S", "-1"),
        ("PARSE_CPU_SECONDS", "0"),
        ("MAX_UPLOAD_BYTES", "0"),
        ("STATS_DEVICE", "warp-drive"),
    ],
)
def test_settings_are_validated(variable, value, tmp_path, monkeypatch):
    monkeypatch.setenv(f"CKPTSCOPE_{variable}", value)
    with pytest.raises(ValidationError):
        Settings()
    r = _cli("serve", "--port", "1", env={f"CKPTSCOPE_{variable}": value, "CKPTSCOPE_DATA_DIR": str(tmp_path)})
    assert r.returncode == 2 and f"CKPTSCOPE_{variable}" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_sandbox_limits_come_from_the_settings():
    s = Settings(parse_memory_bytes=123456789, parse_cpu_seconds=7, parse_timeout_s=9.5)
    assert (s.parse_limits.memory_bytes, s.parse_limits.cpu_seconds, s.parse_limits.timeout_s) == (123456789, 7, 9.5)
