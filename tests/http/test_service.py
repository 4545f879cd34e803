"""Service behaviour: bearer-token auth and the login form, health, the API docs and security headers,
readiness, metrics, request ids, and the settings checked at start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ckptscope.config import Settings
from ckptscope.main import create_app
from tests import factories as f
from tests.helpers import csrf_token, make_client, metric_value, upload, wait_stats

TOKEN = "s3cret-token"


@pytest.fixture
def secured(tmp_path):
    with make_client(tmp_path / "data", api_token=TOKEN) as c:
        yield c


def test_api_needs_the_bearer_token(secured, tmp_path):
    r = secured.get("/api/v1/checkpoints")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert secured.get("/api/v1/checkpoints", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert secured.get("/api/v1/checkpoints", headers=auth).json()["items"] == []
    path = f.save_torch({"w": torch.ones(2)}, tmp_path / "w.pt")
    with path.open("rb") as fh:
        assert secured.post("/api/v1/checkpoints", files={"file": ("w.pt", fh)}).status_code == 401
    assert upload(secured, path, headers=auth).status_code == 201
    assert secured.get("/openapi.json").status_code == 401
    assert secured.get("/healthz").status_code == 200 and secured.get("/readyz").status_code == 200
    assert secured.get("/static/app.css").status_code == 200


def test_pages_redirect_to_a_login_form_that_sets_a_cookie(secured):
    r = secured.get("/checkpoints/x?tensor=a", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fcheckpoints%2Fx%3Ftensor%3Da"
    form = secured.get("/login", params={"next": "/"})
    assert form.status_code == 200 and 'type="password"' in form.text
    csrf = {"csrf_token": csrf_token(secured)}  # the login form's hidden field
    bad = secured.post("/login", data={"token": "nope", "next": "/", **csrf}, follow_redirects=False)
    assert bad.status_code == 401 and "not right" in bad.text
    good = secured.post("/login", data={"token": TOKEN, "next": "/", **csrf}, follow_redirects=False)
    assert good.status_code == 303 and good.headers["location"] == "/"
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    assert secured.get("/").status_code == 200  # the client keeps the cookie
    assert secured.get("/api/v1/checkpoints").status_code == 200  # the cookie works for the API too
    secured.post("/logout", data={"csrf_token": csrf_token(secured)})
    assert secured.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "\\\\evil", "relative"])
def test_login_never_redirects_off_site(secured, target):
    r = secured.post(
        "/login", data={"token": TOKEN, "next": target, "csrf_token": csrf_token(secured)}, follow_redirects=False
    )
    assert r.headers["location"] == "/"


def test_health_openapi_docs_and_security_headers(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/api/v1/checkpoints" in spec["paths"] and "/api/v1/jobs/{job_id}" in spec["paths"]
    assert not any(p == "/" or p.startswith("/checkpoints") for p in spec["paths"])  # pages stay out
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert client.get("/static/vendor/htmx/htmx.min.js").status_code == 200
    csp = docs.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert docs.headers["x-content-type-options"] == "nosniff"


def test_readyz_reports_a_missing_data_directory(tmp_path):
    with make_client(tmp_path / "data") as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        shutil.rmtree(tmp_path / "data" / "blobs")
        r = c.get("/readyz")
        assert r.status_code == 503 and "data directory" in r.json()["status"]


def test_metrics_count_uploads_rejections_jobs_and_requests(tmp_path):
    with make_client(tmp_path / "data") as c:
        body = upload(c, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()
        wait_stats(c, body["id"])
        c.post("/api/v1/checkpoints", files={"file": ("bad.pt", b"junk" * 10)})
        text = c.get("/metrics").text
    assert metric_value(text, "ckptscope_uploads_total") == 1
    assert metric_value(text, "ckptscope_upload_bytes_total") == body["size_bytes"]
    assert metric_value(text, "ckptscope_uploads_rejected_total", reason="unknown_format") == 1
    assert metric_value(text, "ckptscope_jobs_total", kind="stats", state="done") == 1
    assert metric_value(text, "ckptscope_job_duration_seconds_count") == 1
    assert metric_value(text, "ckptscope_http_requests_total", method="POST", status="4xx") == 1
    assert "# TYPE ckptscope_http_requests_total counter" in text


def test_request_ids_are_echoed_or_made(tmp_path):
    with make_client(tmp_path / "data") as c:
        assert c.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
        made = c.get("/healthz", headers={"X-Request-ID": "<bad id>"}).headers["x-request-id"]
        assert made != "<bad id>" and len(made) == 32


def test_stats_device_setting_selects_the_device_engine(tmp_path):
    """CKPTSCOPE_STATS_DEVICE runs stats on a torch device; "cpu" runs the CUDA path's code on the
    CPU device, and its results match the host kernel's."""
    torch.manual_seed(2)
    path = f.save_torch(
        {"w": torch.randn(300, 200), "b": torch.randn(200), "n": torch.tensor([1.0, float("nan")])}, tmp_path / "m.pt"
    )
    results = {}
    for device in ("", "cpu"):
        with make_client(tmp_path / f"data-{device or 'host'}", stats_device=device) as c:
            assert c.app.state.core.jobs.device == (device or None)
            cid = upload(c, path).json()["id"]
            wait_stats(c, cid)
            results[device] = {
                t["name"]: t["stats"] for t in c.get(f"/api/v1/checkpoints/{cid}/tensors").json()["tensors"]
            }
    for name, host in results[""].items():
        dev = results["cpu"][name]
        assert dev["hist"] == host["hist"] and dev["nan"] == host["nan"] and dev["zeros"] == host["zeros"]
        for key in ("mean", "std", "min", "max", "l2"):
            expected = host[key] if host[key] is None else pytest.approx(host[key], rel=1e-9, abs=1e-12)
            assert dev[key] == expected, (name, key)


def test_stats_device_names_are_checked_at_start():
    from ckptscope.stats.devices import resolve_device

    assert resolve_device("") is None and resolve_device("host") is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else None)
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(RuntimeError):
        resolve_device("warp-drive")


def test_serve_refuses_a_stats_device_it_does_not_have(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(tmp_path / "d"), "CKPTSCOPE_STATS_DEVICE": "warp-drive"}
    r = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ckptscope: CKPTSCOPE_STATS_DEVICE:")


def test_refuses_to_start_with_unsafe_torch_override(data_dir, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RuntimeError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        create_app(Settings(data_dir=data_dir))


def test_a_relative_data_directory_serves_uploads_from_any_working_directory(tmp_path, monkeypatch):
    """The README's serve command runs on the default CKPTSCOPE_DATA_DIR=data, relative: the
    sandboxed parser runs in another working directory and must still find the uploaded blob."""
    monkeypatch.chdir(tmp_path)
    assert Settings(data_dir="data").data_dir == tmp_path / "data"
    path = f.save_torch({"w": torch.randn(3, 2)}, tmp_path / "one.pt")
    with make_client(Path("data")) as client:
        r = upload(client, path)
        assert r.status_code == 201, r.text
        wait_stats(client, r.json()["id"])
        tensor = client.get(f"/api/v1/checkpoints/{r.json()['id']}/tensors/w").json()
        assert tensor["stats"]["numel"] == 6
    # the blob landed under the working directory's data/, whichever catalogue the suite runs on
    assert any(p.is_file() for p in (tmp_path / "data" / "blobs").rglob("*"))
