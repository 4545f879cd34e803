"""Observability: Prometheus metrics (prometheus-client) with real values — request latency by route
template (never the raw URL), 5xx, uploads and their bytes, parse failures by code, stats throughput
and queue depth — summed over real server processes that share a data directory (multiprocess
mode, dead processes' live gauges dropped), and every log line of a real server (uvicorn's own
included) as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from ckptscope.config import Settings
from ckptscope.main import create_app
from tests import factories as f
from tests.helpers import make_client, metric_samples, metric_value, upload, wait_stats
from tests.servers import Server, free_port

LATENCY = "ckptscope_http_request_duration_seconds"
CHECKPOINT_ROUTE = "/api/v1/checkpoints/{checkpoint_id}"


def scrape(client_or_server) -> str:
    if isinstance(client_or_server, Server):
        with urllib.request.urlopen(client_or_server.base + "/metrics", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/plain")
            return r.read().decode()
    r = client_or_server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def count(text: str, route: str, method: str = "GET", status: str = "2xx") -> float:
    return metric_samples(text).get(
        (f"{LATENCY}_count", frozenset({"route": route, "method": method, "status": status}.items())), 0
    )


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def queue_emptied(client_or_server) -> str:
    """A scrape once the stats queue depth is 0 (it must be reported, and reach 0)."""
    deadline = time.monotonic() + 60
    while True:
        text = scrape(client_or_server)
        if metric_value(text, "ckptscope_stats_queue_depth") == 0:
            return text
        assert time.monotonic() < deadline, "the stats queue depth never returned to 0"
        time.sleep(0.05)


# --- one process ----------------------------------------------------------------------------------


def test_request_latency_is_labelled_by_route_template_never_the_raw_url(tmp_path):
    with make_client(tmp_path / "data") as c:
        ck = upload(c, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()
        wait_stats(c, ck["id"])  # its polls count too: compare against a scrape taken now
        before = scrape(c)
        for _ in range(5):
            assert c.get(f"/api/v1/checkpoints/{ck['id']}").status_code == 200
        for i in range(3):
            assert c.get(f"/api/v1/checkpoints/missing-{i}").status_code == 404
        for i in range(4):
            assert c.get(f"/no/such/page/{i}").status_code == 404
        assert c.get("/static/app.css").status_code == 200
        after = scrape(c)
        routes = set(c.get("/openapi.json").json()["paths"]) | {"/static"}  # the templates, as documented
    assert count(after, CHECKPOINT_ROUTE) - count(before, CHECKPOINT_ROUTE) == 5
    assert count(after, CHECKPOINT_ROUTE, status="4xx") - count(before, CHECKPOINT_ROUTE, status="4xx") == 3
    assert count(after, "unmatched", status="4xx") == 4
    assert count(after, "/static") == 1
    samples = metric_samples(after)
    labels = {dict(key)["route"] for name, key in samples if name.startswith(LATENCY)}
    assert labels <= routes | {"unmatched"} and CHECKPOINT_ROUTE in labels
    assert ck["id"] not in after and "missing-" not in after and "/no/such" not in after
    # a histogram: buckets up to +Inf hold every observation, and the sum is the time spent
    key = frozenset({"route": CHECKPOINT_ROUTE, "method": "GET", "status": "4xx"}.items())
    assert samples[(f"{LATENCY}_bucket", key | {("le", "+Inf")})] == samples[(f"{LATENCY}_count", key)]
    assert samples[(f"{LATENCY}_sum", key)] > 0
    assert metric_value(after, "ckptscope_http_requests_total", method="GET", status="4xx") >= 7


def test_requests_refused_before_routing_keep_their_route(tmp_path):
    with make_client(tmp_path / "data", api_token="tok") as c:
        for i in range(3):
            assert c.get(f"/api/v1/checkpoints/x{i}").status_code == 401
        assert c.get("/metrics").status_code == 401  # behind the token too (Prometheus sends it)
        c.headers["Authorization"] = "Bearer tok"
        text = scrape(c)
    assert count(text, CHECKPOINT_ROUTE, status="4xx") == 3
    assert count(text, "/metrics", status="4xx") == 1


def test_a_5xx_is_counted_with_its_route(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data"))

    @app.get("/api/v1/test-boom/{n}")
    def boom(n: int) -> None:
        raise RuntimeError(f"boom {n}")

    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
        for n in range(2):
            assert c.get(f"/api/v1/test-boom/{n}").status_code == 500
        text = scrape(c)
    assert metric_value(text, "ckptscope_http_errors_total") == 2
    assert count(text, "/api/v1/test-boom/{n}", status="5xx") == 2
    assert metric_value(text, "ckptscope_http_requests_total", method="GET", status="5xx") == 2


def test_upload_bytes_parse_failures_by_code_and_stats_throughput(tmp_path):
    torch.manual_seed(0)
    good = f.save_safetensors({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "good.safetensors")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with make_client(tmp_path / "data") as c:
        ck = upload(c, good).json()
        assert wait_stats(c, ck["id"])["stats_state"] == "done"
        junk = c.post("/api/v1/checkpoints", files={"file": ("bad.pt", b"junk" * 10)})
        cut = c.post("/api/v1/checkpoints", files={"file": ("cut.safetensors", truncated.read_bytes())})
        codes = [junk.json()["code"], cut.json()["code"]]
        text = queue_emptied(c)  # the job leaves the queue just after its checkpoint says done
    assert junk.status_code == cut.status_code == 422 and codes[0] == "unknown_format" and codes[1] != codes[0]
    assert metric_value(text, "ckptscope_uploads_total") == 1
    assert metric_value(text, "ckptscope_upload_bytes_total") == ck["size_bytes"] == good.stat().st_size
    for code in codes:
        assert metric_value(text, "ckptscope_parse_failures_total", code=code) == 1
        assert metric_value(text, "ckptscope_uploads_rejected_total", reason=code) == 1
    assert metric_value(text, "ckptscope_jobs_total", kind="stats", state="done") == 1
    assert metric_value(text, "ckptscope_stats_bytes_total") == (64 * 64 + 64) * 4
    seconds = metric_value(text, "ckptscope_stats_seconds_total")
    assert seconds > 0 and metric_value(text, "ckptscope_job_duration_seconds_sum") == pytest.approx(seconds)
    assert metric_value(text, "ckptscope_job_duration_seconds_count") == 1


# --- several real server processes sharing one data directory --------------------------------------


def slow_checkpoint(tmp_path: Path, name: str, tensors: int = 20) -> Path:
    torch.manual_seed(sum(map(ord, name)))
    return f.save_safetensors({f"layers.{i}.w": torch.randn(130, 130) for i in range(tensors)}, tmp_path / name)


def json_lines(log: str) -> list[dict]:
    lines = [line for line in log.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line is not JSON: {line!r}") from None
    return parsed


@pytest.mark.e2e
def test_processes_sharing_a_data_dir_report_the_sum_and_drop_dead_gauges(tmp_path, shared):
    data, env = shared
    servers: list[Server] = []
    try:
        a = Server(data, env, slow_stats_s=0.1)
        servers.append(a)
        b = Server(data, env)
        servers.append(b)
        for _ in range(6):
            assert a.request("GET", "/api/v1/checkpoints/nope")[0] == 404
        # requests to A appear in B's /metrics (and B's own requests to that route: none)
        assert count(scrape(b), CHECKPOINT_ROUTE, status="4xx") == 6

        ck = a.upload(slow_checkpoint(tmp_path, "one.safetensors"))
        wait_for(lambda: metric_value(scrape(b), "ckptscope_stats_queue_depth") == 1, what="A's job in B's queue depth")
        wait_for(lambda: a.get(f"/api/v1/checkpoints/{ck['id']}")["stats_state"] == "done", what="stats")
        text = queue_emptied(b)
        assert metric_value(text, "ckptscope_stats_bytes_total") == 20 * 130 * 130 * 4 == ck["total_bytes"]
        assert metric_value(text, "ckptscope_upload_bytes_total") == ck["size_bytes"]
        assert metric_value(text, "ckptscope_jobs_total", kind="stats", state="done") == 1

        # A dies (SIGKILL) with a job running: its queue depth leaves the sum, its counts stay
        a.upload(slow_checkpoint(tmp_path, "two.safetensors"))
        wait_for(lambda: metric_value(scrape(b), "ckptscope_stats_queue_depth") == 1, what="the second job")
        a.proc.kill()
        a.proc.wait(timeout=20)
        text = scrape(b)
        assert metric_value(text, "ckptscope_stats_queue_depth") == 0
        assert count(text, CHECKPOINT_ROUTE, status="4xx") == 6
        assert metric_value(text, "ckptscope_uploads_total") == 2

        # a new process takes the dead one's slot and continues its counts: files stay few
        c = Server(data, env)
        servers.append(c)
        assert c.request("GET", "/api/v1/checkpoints/nope")[0] == 404
        assert count(scrape(b), CHECKPOINT_ROUTE, status="4xx") == 7
        assert sorted(p.name for p in (data / "metrics").glob("slot-*.lock")) == ["slot-0.lock", "slot-1.lock"]
        assert b.terminate() and c.terminate()
        for srv in (b, c):  # every line of `ckptscope serve`'s output is JSON, uvicorn's own too
            records = json_lines(srv.log())
            loggers = {r["logger"] for r in records}
            assert {"uvicorn.error", "ckptscope", "ckptscope.access"} <= loggers, loggers
            assert any(r["msg"].startswith("Application shutdown complete") for r in records)
            assert not any("exc" in r for r in records), srv.log()
    finally:
        for srv in servers:
            srv.stop()


@pytest.mark.e2e
def test_a_plain_uvicorn_start_logs_json_on_stderr(tmp_path):
    port = free_port()
    err = tmp_path / "stderr.log"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "ckptscope.main:create_app", "--port", str(port)],
            env={**os.environ, "CKPTSCOPE_DATA_DIR": str(tmp_path / "data")},
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:

            def up() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        return r.status == 200
                except OSError:
                    assert proc.poll() is None, err.read_text()
                    return False

            wait_for(up, what="uvicorn")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert (
                    metric_value(r.read().decode(), f"{LATENCY}_count", route="/healthz", method="GET", status="2xx")
                    >= 1
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    records = json_lines(err.read_text())
    assert {"uvicorn.error", "ckptscope.access"} <= {r["logger"] for r in records}
    assert any("Application shutdown complete" in r["msg"] for r in records)
