"""Several real uvicorn processes sharing one data directory and one catalogue (SQLite, or
PostgreSQL under scripts/with-postgres.sh): concurrent uploads, deletion racing an upload of the
same bytes, a stats job whose checkpoint another process deletes, graceful shutdown, and work of a
crashed process taken over. (Migrations run by several processes at once: tests/store/test_migrations.py.)"""

from __future__ import annotations

import hashlib
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests import factories as f
from tests.helpers import metric_value
from tests.servers import Server

pytestmark = pytest.mark.e2e


@pytest.fixture
def servers(shared):
    started: list[Server] = []

    def start(slow_stats_s: float = 0.0, **env: str) -> Server:
        srv = Server(shared[0], {**shared[1], **env}, slow_stats_s=slow_stats_s)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
        assert "Traceback" not in srv.log(), srv.log()


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stats_done(srv: Server, checkpoint_id: str) -> dict:
    return wait_for(
        lambda: (body := srv.get(f"/api/v1/checkpoints/{checkpoint_id}"))["stats_state"] == "done" and body,
        what=f"stats of {checkpoint_id}",
    )


def blob_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "blobs").rglob("*") if p.is_file())


def download(srv: Server, checkpoint_id: str) -> bytes:
    with urllib.request.urlopen(f"{srv.base}/api/v1/checkpoints/{checkpoint_id}/download", timeout=60) as r:
        return r.read()


def slow_checkpoint(tmp_path: Path, tensors: int = 40) -> Path:
    """Tensors just above the batched size, so each goes through (slowed) tensor_stats."""
    torch.manual_seed(0)
    return f.save_safetensors(
        {f"layers.{i}.w": torch.randn(130, 130) for i in range(tensors)}, tmp_path / "slow.safetensors"
    )


def test_concurrent_uploads_of_the_same_and_different_files(tmp_path, shared, servers):
    a, b = servers(), servers()
    # many tensors: registering takes long enough (thousands of rows) for the uploads to overlap
    files = [
        f.save_safetensors({f"m.{j}.w": torch.full((4, 4), float(i)) for j in range(3000)}, tmp_path / f"f{i}.st")
        for i in range(3)
    ]
    work = [(srv, files[0]) for srv in (a, b) for _ in range(4)] + [(a, files[1]), (b, files[2]), (a, files[2])]
    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(lambda job: job[0].upload(job[1]), work))
    ids = {r["id"] for r in results}
    assert len(ids) == len(work)
    for srv in (a, b):
        assert {c["id"] for c in srv.get("/api/v1/checkpoints")["items"]} == ids
    shas = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert {r["sha256"] for r in results} == shas
    for r in results:
        assert stats_done(b, r["id"])["tensor_count"] == 3000
        assert b.get(f"/api/v1/checkpoints/{r['id']}/tensors")["tensors"][0]["stats"]["numel"] == 16
    data = shared[0]
    assert blob_files(data) == sorted(shas)  # one blob per distinct content
    assert not list((data / "pins").iterdir()) and not list((data / "tmp").iterdir())


def test_deleting_in_one_process_never_removes_bytes_another_is_registering(tmp_path, shared, servers):
    a, b = servers(), servers()
    path = f.save_safetensors({"w": torch.randn(32, 32), "b": torch.zeros(32)}, tmp_path / "same.safetensors")
    expected = path.read_bytes()
    for round_ in range(10):
        uploader, deleter = (a, b) if round_ % 2 else (b, a)
        first = uploader.upload(path)
        with ThreadPoolExecutor(2) as pool:
            deleting = pool.submit(deleter.request, "DELETE", f"/api/v1/checkpoints/{first['id']}")
            uploading = pool.submit(uploader.upload, path)
            assert deleting.result()[0] == 204
            second = uploading.result()
        assert download(deleter, second["id"]) == expected  # the survivor's bytes are whole
        stats_done(deleter, second["id"])
        assert deleter.request("DELETE", f"/api/v1/checkpoints/{second['id']}")[0] == 204
    data = shared[0]
    assert blob_files(data) == [] and not list((data / "pins").iterdir())
    assert a.get("/api/v1/checkpoints")["items"] == []


def test_a_stats_job_stops_when_another_process_deletes_its_checkpoint(tmp_path, shared, servers):
    a, b = servers(slow_stats_s=0.2), servers()
    ck = a.upload(slow_checkpoint(tmp_path))
    job = wait_for(lambda: (j := b.get(f"/api/v1/jobs/{ck['job_id']}"))["state"] == "running" and j, what="job start")
    assert job["done"] < job["total"]
    assert b.request("DELETE", f"/api/v1/checkpoints/{ck['id']}")[0] == 204
    job = wait_for(
        lambda: (j := a.get(f"/api/v1/jobs/{ck['job_id']}"))["state"] != "running" and j, timeout=15, what="cancel"
    )
    assert job["state"] == "cancelled" and job["done"] < job["total"]
    assert a.request("GET", f"/api/v1/checkpoints/{ck['id']}")[0] == 404
    assert blob_files(shared[0]) == []
    with urllib.request.urlopen(a.base + "/metrics", timeout=10) as r:
        assert metric_value(r.read().decode(), "ckptscope_jobs_total", kind="stats", state="cancelled") == 1


def test_graceful_shutdown_abandons_a_running_job_and_the_next_start_finishes_it(tmp_path, shared, servers):
    a = servers(slow_stats_s=0.2)
    ck = a.upload(slow_checkpoint(tmp_path))
    wait_for(lambda: a.get(f"/api/v1/jobs/{ck['job_id']}")["state"] == "running", what="job start")
    started = time.monotonic()
    assert a.terminate()  # SIGTERM, as `docker stop` sends
    assert time.monotonic() - started < 30
    assert "abandoned" in a.log()
    b = servers()
    body = stats_done(b, ck["id"])  # picked up at start, computed by the new process
    assert b.get(f"/api/v1/jobs/{ck['job_id']}")["state"] == "abandoned"  # ended, with a finish time
    assert b.get(f"/api/v1/jobs/{ck['job_id']}")["finished_at"] is not None
    assert body["job_id"] != ck["job_id"]
    assert b.get(f"/api/v1/jobs/{body['job_id']}")["state"] == "done"
    tensors = b.get(f"/api/v1/checkpoints/{ck['id']}/tensors?limit=100")["tensors"]
    assert len(tensors) == 40 and all(t["stats"] is not None for t in tensors)


def test_work_of_a_crashed_process_is_taken_over(tmp_path, shared, servers):
    a = servers(slow_stats_s=0.2)
    ck = a.upload(slow_checkpoint(tmp_path))
    wait_for(lambda: a.get(f"/api/v1/jobs/{ck['job_id']}")["state"] == "running", what="job start")
    a.proc.kill()  # SIGKILL: no shutdown; its claim stays "running" and stops being renewed
    a.proc.wait(timeout=20)
    b = servers(CKPTSCOPE_JOB_STALE_S="2")
    body = stats_done(b, ck["id"])
    assert body["job_id"] != ck["job_id"]
    assert b.get(f"/api/v1/jobs/{ck['job_id']}")["state"] == "abandoned"
    assert b.get(f"/api/v1/jobs/{body['job_id']}")["state"] == "done"
    tensors = b.get(f"/api/v1/checkpoints/{ck['id']}/tensors?limit=100")["tensors"]
    assert all(t["stats"] is not None for t in tensors)
