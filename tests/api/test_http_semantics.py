"""HTTP semantics of the REST API (issue 16): RFC 3339 timestamps, `Allow` on 405, 400 for
malformed JSON, 201 with `Location`, a paginated checkpoint list, ETags with `Cache-Control` and
304 on content-addressed JSON, `Idempotency-Key` on uploads, and unhandled errors that keep the
request id, the security headers and an access-log line. In-process (TestClient) where that is
enough; real uvicorn servers for the unhandled error, the pending stats and several processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from ckptscope.http.caching import IMMUTABLE_PRIVATE, IMMUTABLE_PUBLIC, none_match, parse_if_none_match
from tests import factories as f
from tests.helpers import ROOT, make_client, upload, wait_stats
from tests.servers import Server, free_port

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def small_file(tmp_path: Path, seed: int, name: str = "w.safetensors") -> Path:
    torch.manual_seed(seed)
    return f.save_safetensors({"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}, tmp_path / name)


def uploaded(client, path: Path, **kwargs) -> dict:
    r = upload(client, path, **kwargs)
    assert r.status_code == 201, r.text
    return r.json()


def blob_count(data_dir: Path) -> int:
    return len([p for p in (data_dir / "blobs").rglob("*") if p.is_file()])


# --- timestamps ----------------------------------------------------------------------------------


def assert_utc(text: str, near: datetime) -> None:
    assert RFC3339.match(text), text
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0)
    assert abs(moment - near) < timedelta(minutes=5), (text, near)


def test_every_timestamp_carries_its_timezone(client, tmp_path):
    now = datetime.now(UTC)
    body = uploaded(client, small_file(tmp_path, 1))
    assert_utc(body["created_at"], now)
    wait_stats(client, body["id"])
    assert_utc(client.get(f"/api/v1/checkpoints/{body['id']}").json()["created_at"], now)
    assert_utc(client.get("/api/v1/checkpoints").json()["items"][0]["created_at"], now)
    job = client.get(f"/api/v1/jobs/{body['job_id']}").json()
    assert_utc(job["created_at"], now)
    assert_utc(job["finished_at"], now)
    renamed = client.patch(f"/api/v1/checkpoints/{body['id']}", json={"name": "x"}).json()
    assert_utc(renamed["created_at"], now)
    export = client.post(f"/api/v1/checkpoints/{body['id']}/export", json={"include": ["a."]})
    assert export.status_code == 201, export.text
    assert_utc(export.json()["created_at"], now)


# --- 405, 400 --------------------------------------------------------------------------------------


def allow(response) -> set[str]:
    return {m.strip() for m in response.headers["allow"].split(",")}


def test_405_names_every_method_of_the_path_and_keeps_the_problem_body(client, tmp_path):
    cid = uploaded(client, small_file(tmp_path, 2))["id"]
    cases = {
        ("PUT", "/api/v1/checkpoints"): {"GET", "POST"},
        ("POST", f"/api/v1/checkpoints/{cid}"): {"GET", "PATCH", "DELETE"},
        ("DELETE", f"/api/v1/checkpoints/{cid}/tree"): {"GET"},
        ("PUT", "/api/v1/copy"): {"POST"},
        ("POST", "/api/v1/jobs/abc"): {"GET"},
    }
    for (method, path), methods in cases.items():
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.text)
        assert allow(r) == methods, (method, path, r.headers["allow"])
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["status"] == 405 and r.json()["instance"] == path
        assert r.headers["x-request-id"] and r.headers["x-content-type-options"] == "nosniff"


def test_a_malformed_json_body_is_400_and_a_wrong_shape_stays_422(client, tmp_path):
    cid = uploaded(client, small_file(tmp_path, 3))["id"]
    headers = {"content-type": "application/json"}
    for path in ("/api/v1/copy", f"/api/v1/checkpoints/{cid}/export", f"/api/v1/checkpoints/{cid}/check"):
        for raw in (b"{bad", b'{"rules": ["no-nan"]', b"\xff\xfe"):
            r = client.post(path, content=raw, headers=headers)
            assert r.status_code == 400, (path, raw, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "bad_json" and "JSON" in r.json()["detail"]
    r = client.patch(f"/api/v1/checkpoints/{cid}", content=b'{"name": ', headers=headers)
    assert r.status_code == 400 and r.json()["code"] == "bad_json"
    wrong = client.post("/api/v1/copy", content=b"[1, 2]", headers=headers)
    assert wrong.status_code == 422 and wrong.json()["code"] == "validation"


# --- 201 + Location ------------------------------------------------------------------------------


def test_creating_operations_answer_201_with_the_new_checkpoints_location(client, tmp_path):
    a = upload(client, small_file(tmp_path, 4, "a.safetensors"))
    assert a.status_code == 201 and a.headers["location"] == f"/api/v1/checkpoints/{a.json()['id']}"
    assert client.get(a.headers["location"]).json()["id"] == a.json()["id"]
    raw_path = small_file(tmp_path, 5, "b.safetensors")
    raw = client.post(
        "/api/v1/checkpoints?filename=b.safetensors",
        content=raw_path.read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert raw.status_code == 201 and raw.headers["location"] == f"/api/v1/checkpoints/{raw.json()['id']}"

    export = client.post(f"/api/v1/checkpoints/{a.json()['id']}/export", json={"include": ["a.weight"]})
    assert export.status_code == 201, export.text
    assert export.headers["location"] == f"/api/v1/checkpoints/{export.json()['id']}"
    assert client.get(export.headers["location"]).json()["tensor_count"] == 1

    body = {"source": a.json()["id"], "target": raw.json()["id"], "mapping": {"a.": "a."}}
    copied = client.post("/api/v1/copy", json=body)
    assert copied.status_code == 201, copied.text
    new_id = copied.json()["checkpoint"]["id"]
    assert copied.headers["location"] == f"/api/v1/checkpoints/{new_id}"
    dry = client.post("/api/v1/copy", json=body | {"dry_run": True})
    assert dry.status_code == 200 and "location" not in dry.headers  # nothing made


# --- the checkpoint list -------------------------------------------------------------------------


def test_the_checkpoint_list_is_paginated_newest_first(client, tmp_path):
    ids = [uploaded(client, small_file(tmp_path, 10 + i, f"c{i}.safetensors"))["id"] for i in range(4)]
    newest_first = ids[::-1]
    page = client.get("/api/v1/checkpoints").json()
    assert page["total"] == 4 and page["offset"] == 0 and page["limit"] == 100
    assert [c["id"] for c in page["items"]] == newest_first
    assert set(page["items"][0]) >= {"id", "name", "sha256", "created_at", "stats_state", "job_id"}
    middle = client.get("/api/v1/checkpoints", params={"offset": 1, "limit": 2}).json()
    assert middle["total"] == 4 and [c["id"] for c in middle["items"]] == newest_first[1:3]
    assert client.get("/api/v1/checkpoints", params={"offset": 4}).json() == {
        "total": 4,
        "offset": 4,
        "limit": 100,
        "items": [],
    }
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"offset": 10**10}, {"limit": "x"}):
        r = client.get("/api/v1/checkpoints", params=bad)
        assert r.status_code == 422 and r.json()["code"] == "validation", (bad, r.text)
    client.delete(f"/api/v1/checkpoints/{ids[0]}")
    assert client.get("/api/v1/checkpoints", params={"limit": 1}).json()["total"] == 3


# --- entity tags ---------------------------------------------------------------------------------


def test_if_none_match_parsing_follows_rfc_9110():
    assert parse_if_none_match('"a"') == ['"a"']
    assert parse_if_none_match(' W/"a" ,"b,c",, "" ') == ['"a"', '"b,c"', '""']
    assert parse_if_none_match("*") == ["*"]
    for malformed in ("a", '"a" "b"', '"a', 'W/ "a"', "", ",", '"a", b'):
        assert parse_if_none_match(malformed) is None, malformed
    assert none_match('W/"x", "y"', '"x"') and none_match('"y", W/"x"', 'W/"x"')  # weak comparison
    assert not none_match('"x"', '"xx"') and not none_match('"x"', None) and not none_match(None, '"x"')
    assert none_match("*", None) and none_match("*", '"x"')


def content_addressed(cid: str) -> dict[str, str]:
    base = f"/api/v1/checkpoints/{cid}"
    return {
        "tree": f"{base}/tree",
        "subtree": f"{base}/tree?path=layers.1&depth=1",
        "tensors": f"{base}/tensors?limit=3",
        "tensors offset": f"{base}/tensors?limit=3&offset=3",
        "tensors sorted": f"{base}/tensors?limit=3&sort=std&desc=true",
        "tensors filtered": f"{base}/tensors?limit=3&prefix=layers.",
    }


def layered(tmp_path: Path, layers: int, seed: int = 0, name: str = "layers.safetensors") -> Path:
    torch.manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(8, 8) for i in range(layers)}
    tensors |= {f"layers.{i}.bias": torch.randn(8) for i in range(layers)}
    return f.save_safetensors(tensors, tmp_path / name)


def test_finished_content_addressed_json_is_immutable_with_an_etag_and_304(client, tmp_path):
    cid = uploaded(client, layered(tmp_path, 4))["id"]
    wait_stats(client, cid)
    tags = {}
    for what, url in content_addressed(cid).items():
        r = client.get(url)
        assert r.status_code == 200, (what, r.text)
        etag = r.headers["etag"]
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag), (what, etag)
        assert r.headers["cache-control"] == IMMUTABLE_PUBLIC == "public, max-age=31536000, immutable"
        assert client.get(url).headers["etag"] == etag  # derived: the same inputs, the same tag
        tags[what] = etag
        for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            hit = client.get(url, headers={"If-None-Match": header})
            assert hit.status_code == 304, (what, header, hit.text)
            assert hit.content == b"" and hit.headers["etag"] == etag
            assert hit.headers["cache-control"] == IMMUTABLE_PUBLIC
            assert hit.headers["x-request-id"] and hit.headers["x-frame-options"] == "DENY"
        for header in ('"nope"', "W/" + etag[:-1] + 'x"', "garbage"):
            miss = client.get(url, headers={"If-None-Match": header})
            assert miss.status_code == 200 and miss.json(), (what, header)
    assert len(set(tags.values())) == len(tags)  # each query its own tag

    # a second checkpoint of the same bytes: the same content, so the same tags
    other = uploaded(client, layered(tmp_path, 4, name="again.safetensors"))["id"]
    wait_stats(client, other)
    for what, url in content_addressed(other).items():
        assert client.get(url).headers["etag"] == tags[what], what
    # other bytes: other tags
    third = uploaded(client, layered(tmp_path, 4, seed=1, name="other.safetensors"))["id"]
    wait_stats(client, third)
    assert client.get(content_addressed(third)["tree"]).headers["etag"] != tags["tree"]

    # a tag never stands in for a missing resource
    assert client.get("/api/v1/checkpoints/nope/tree", headers={"If-None-Match": tags["tree"]}).status_code == 404
    missing = f"/api/v1/checkpoints/{cid}/tree?path=layers.99"
    assert client.get(missing, headers={"If-None-Match": "*"}).status_code == 404
    bad_sort = f"/api/v1/checkpoints/{cid}/tensors?limit=3&sort=bogus"
    assert client.get(bad_sort, headers={"If-None-Match": "*"}).status_code == 422


def test_a_tensor_has_an_etag_that_follows_the_identical_tensors_elsewhere(client, tmp_path):
    cid = uploaded(client, layered(tmp_path, 2))["id"]
    wait_stats(client, cid)
    url = f"/api/v1/checkpoints/{cid}/tensors/layers.0.weight"
    first = client.get(url)
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache"  # it names other checkpoints: revalidate
    assert first.json()["identical_elsewhere"]["count"] == 0
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    # the same tensor in another checkpoint changes identical_elsewhere, so the tag
    torch.manual_seed(0)
    same = torch.randn(8, 8)
    other = uploaded(client, f.save_safetensors({"x": same}, tmp_path / "x.safetensors"))["id"]
    wait_stats(client, other)
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 200 and again.json()["identical_elsewhere"]["count"] == 1
    assert again.headers["etag"] != etag


def test_with_a_token_cached_answers_are_private(tmp_path):
    token = "t" * 32
    with make_client(tmp_path / "data", api_token=token) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        cid = uploaded(client, layered(tmp_path, 2))["id"]
        wait_stats(client, cid)
        r = client.get(f"/api/v1/checkpoints/{cid}/tree")
        assert r.headers["cache-control"] == IMMUTABLE_PRIVATE and r.headers["etag"]
        del client.headers["Authorization"]
        assert client.get(f"/api/v1/checkpoints/{cid}/tree", headers={"If-None-Match": "*"}).status_code == 401


def test_a_304_reads_no_tensor_page(client, tmp_path, monkeypatch):
    """A revalidation is answered from the checkpoint's validators alone (how much cheaper that is
    is measured by bench/pages.py, not here)."""
    torch.manual_seed(0)
    path = f.save_safetensors({f"blocks.{i}.w": torch.randn(16, 16) for i in range(300)}, tmp_path / "300.safetensors")
    cid = uploaded(client, path)["id"]
    wait_stats(client, cid)
    url = f"/api/v1/checkpoints/{cid}/tensors?limit=5000"
    full = client.get(url)
    assert len(full.json()["tensors"]) == 300
    etag = full.headers["etag"]

    # the 304 is decided before the page is read: no tensor query at all
    import ckptscope.services.checkpoints as svc

    def no_page(*args, **kwargs):
        raise AssertionError("a 304 read the tensor page")

    monkeypatch.setattr(svc, "tensor_page", no_page)
    from ckptscope.store.queries import CatalogueQueries  # the tensors route reads its rows here

    for reader in ("tensor_rows", "tensor_positions", "tensor_rows_at"):
        monkeypatch.setattr(CatalogueQueries, reader, no_page)
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304


@pytest.mark.e2e
def test_pending_stats_are_never_cached_then_finished_ones_are(tmp_path):
    server = Server(tmp_path / "data", _database_env(), slow_stats_s=1.0)
    try:
        path = f.save_safetensors({f"t{i}": torch.randn(200, 200) for i in range(6)}, tmp_path / "slow.safetensors")
        body = server.upload(path)
        urls = [
            f"/api/v1/checkpoints/{body['id']}/tree",
            f"/api/v1/checkpoints/{body['id']}/tensors",
            f"/api/v1/checkpoints/{body['id']}/tensors/t0",
        ]
        for url in urls:
            headers, payload = _get(server, url)
            assert payload["stats_state"] in ("pending", "running"), payload["stats_state"]
            assert headers["cache-control"] == "no-cache" and "etag" not in headers, (url, headers)
        deadline = time.monotonic() + 60
        while server.get(f"/api/v1/checkpoints/{body['id']}")["stats_state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for url in urls:
            headers, _ = _get(server, url)
            assert headers["etag"] and headers["cache-control"] in (IMMUTABLE_PUBLIC, "no-cache"), headers
            status, _ = _status(server, url, {"If-None-Match": headers["etag"]})
            assert status == 304
    finally:
        server.stop()


def _database_env() -> dict[str, str]:
    url = os.environ.get("CKPTSCOPE_DATABASE_URL")
    return {"CKPTSCOPE_DATABASE_URL": url} if url else {}


def _get(server: Server, path: str, headers: dict | None = None) -> tuple[dict[str, str], dict]:
    req = urllib.request.Request(server.base + path, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())


def _status(server: Server, path: str, headers: dict) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(server.base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


# --- Idempotency-Key -----------------------------------------------------------------------------


def test_a_retried_upload_with_its_key_returns_the_first_checkpoint(client, data_dir, tmp_path):
    path = small_file(tmp_path, 20)
    key = {"Idempotency-Key": "3f1c7f0e-9d1b-4d7e-8a55-2f6f0d7c9b11"}
    first = upload(client, path, headers=key)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    retry = upload(client, path, headers=key)
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["location"] == f"/api/v1/checkpoints/{first.json()['id']}"
    raw = client.post(
        "/api/v1/checkpoints?filename=w.safetensors",
        content=path.read_bytes(),
        headers=key | {"content-type": "application/octet-stream"},
    )
    assert raw.status_code == 200 and raw.json()["id"] == first.json()["id"]  # the same request, raw
    assert client.get("/api/v1/checkpoints").json()["total"] == 1
    assert list((data_dir / "tmp").iterdir()) == [] and blob_count(data_dir) == 1

    # without a key, the same bytes are a second checkpoint (of the same content), as before
    assert uploaded(client, path)["id"] != first.json()["id"]
    # another key, another checkpoint
    assert upload(client, path, headers={"Idempotency-Key": "other"}).status_code == 201
    assert client.get("/api/v1/checkpoints").json()["total"] == 3


def test_a_key_reused_for_another_upload_is_refused(client, data_dir, tmp_path):
    key = {"Idempotency-Key": "run-42 upload"}
    first = upload(client, small_file(tmp_path, 21, "a.safetensors"), headers=key)
    assert first.status_code == 201
    other_bytes = upload(client, small_file(tmp_path, 22, "a.safetensors"), headers=key)
    other_name = upload(client, small_file(tmp_path, 21, "b.safetensors"), headers=key)
    for r in (other_bytes, other_name):
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "idempotency-key-reused" and "Idempotency-Key" in r.json()["detail"]
    assert client.get("/api/v1/checkpoints").json()["total"] == 1
    assert blob_count(data_dir) == 1 and list((data_dir / "tmp").iterdir()) == []  # the refused bytes are gone

    # deleting the checkpoint frees its key
    assert client.delete(f"/api/v1/checkpoints/{first.json()['id']}").status_code == 204
    again = upload(client, small_file(tmp_path, 22, "a.safetensors"), headers=key)
    assert again.status_code == 201 and again.json()["id"] != first.json()["id"]


def test_a_malformed_idempotency_key_is_a_validation_problem(client, data_dir, tmp_path):
    path = small_file(tmp_path, 23)
    for bad in ("k" * 201, "caf\xe9", "tab\there", "\x7f"):
        r = upload(client, path, headers={"Idempotency-Key": bad.encode("latin-1")})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["code"] == "validation" and "Idempotency-Key" in r.json()["detail"]
    assert upload(client, path, headers={"Idempotency-Key": "k" * 200}).status_code == 201
    assert upload(client, path, headers={"Idempotency-Key": " ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}).status_code == 201
    assert client.get("/api/v1/checkpoints").json()["total"] == 2


@pytest.mark.e2e
def test_retries_racing_on_two_server_processes_make_one_checkpoint(shared, tmp_path):
    a, b = Server(shared[0], shared[1]), Server(shared[0], shared[1])
    try:
        torch.manual_seed(3)
        path = f.save_safetensors({f"w{i}": torch.randn(64, 64) for i in range(20)}, tmp_path / "race.safetensors")
        data = path.read_bytes()

        def send(server: Server) -> tuple[int, dict]:
            return server.request(
                "POST",
                "/api/v1/checkpoints?filename=race.safetensors",
                data,
                {"Content-Type": "application/octet-stream", "Idempotency-Key": "race"},
            )

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(send, [a, b, a, b, a, b]))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 200, 200, 200, 200, 201], results
        assert len({body["id"] for _, body in results}) == 1
        assert a.get("/api/v1/checkpoints")["total"] == 1 == b.get("/api/v1/checkpoints")["total"]
    finally:
        a.stop()
        b.stop()
    assert "Traceback" not in a.log() + b.log()


@pytest.mark.e2e
def test_the_idempotency_migration_goes_down_and_up(shared):
    from alembic import command
    from sqlalchemy import inspect

    from ckptscope.config import Settings
    from ckptscope.store.catalogue import make_engine
    from ckptscope.store.migrate import _config, head_revision, upgrade

    url = shared[1].get("CKPTSCOPE_DATABASE_URL") or Settings(data_dir=shared[0]).resolved_database_url
    shared[0].mkdir(parents=True)
    engine = make_engine(url)
    try:
        assert upgrade(engine) == head_revision()
        assert inspect(engine).has_table("idempotency_keys")
        with engine.connect() as conn:
            command.downgrade(_config(conn), "0005")
            conn.commit()
        assert not inspect(engine).has_table("idempotency_keys")
        assert upgrade(engine) == head_revision()
        assert {c["name"] for c in inspect(engine).get_columns("idempotency_keys")} == {
            "key",
            "fingerprint",
            "checkpoint_id",
            "created_at",
        }
    finally:
        engine.dispose()


# --- unhandled errors ----------------------------------------------------------------------------

BROKEN_SERVER = """
import sys

import ckptscope.services.checkpoints as svc


def broken(*args, **kwargs):
    raise RuntimeError("a bug for the test")


svc.get_checkpoint = broken

from ckptscope.cli import main

sys.exit(main())
"""


def test_an_unhandled_error_in_process_is_a_problem_with_the_request_id(client, monkeypatch):
    import ckptscope.services.checkpoints as svc

    def broken(*args, **kwargs):
        raise RuntimeError("a bug for the test")

    monkeypatch.setattr(svc, "get_checkpoint", broken)
    r = client.get("/api/v1/checkpoints/x", headers={"X-Request-ID": "req-500"})
    page = client.get("/checkpoints/x", headers={"Accept": "text/html"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "internal" and r.json()["request_id"] == "req-500"
    assert "a bug for the test" not in r.text  # the log has it, not the client
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] and page.headers["x-request-id"]


@pytest.mark.e2e
def test_an_unhandled_error_keeps_request_id_headers_access_log_and_one_traceback(tmp_path):
    script = tmp_path / "broken_server.py"
    script.write_text(BROKEN_SERVER)
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(tmp_path / "data"), **_database_env()}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "serve", "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        req = urllib.request.Request(base + "/api/v1/checkpoints/abc", headers={"X-Request-ID": "boom-1"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=30)
        error = caught.value
        body = json.loads(error.read())
        assert error.code == 500 and error.headers["X-Request-ID"] == "boom-1"
        assert error.headers["Content-Type"].startswith("application/problem+json")
        assert body["code"] == "internal" and body["request_id"] == "boom-1" and body["status"] == 500
        for header in ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options"):
            assert error.headers[header], header
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        errors = re.search(r"^ckptscope_http_errors_total(?:\{[^}]*\})? (\S+)$", metrics, re.M)
        assert errors and float(errors.group(1)) == 1.0, metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log_path.read_text()
    assert text.count("Traceback (most recent call last)") == 1, text
    assert "a bug for the test" in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("logger") == "ckptscope.access" and e.get("request_id") == "boom-1"]
    assert len(access) == 1 and access[0]["status"] == 500, access


def test_a_key_taken_while_the_retry_was_parsed_returns_the_winner(client, data_dir, tmp_path, monkeypatch):
    """The race the catalogue settles: a retry looked its key up before the first request committed
    (simulated: the lookup finds nothing), so it parses and registers, and the key, taken by then,
    makes its transaction return the first request's checkpoint, or refuse another upload."""
    path = small_file(tmp_path, 30)
    first = upload(client, path, headers={"Idempotency-Key": "late"})
    assert first.status_code == 201
    queries = client.app.state.core.queries
    monkeypatch.setattr(queries, "checkpoint_for_key", lambda key, fingerprint: None)
    retry = upload(client, path, headers={"Idempotency-Key": "late"})
    assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"], retry.text
    other = upload(client, small_file(tmp_path, 31), headers={"Idempotency-Key": "late"})
    assert other.status_code == 422 and other.json()["code"] == "idempotency-key-reused"
    assert client.get("/api/v1/checkpoints").json()["total"] == 1
    assert blob_count(data_dir) == 1 and list((data_dir / "tmp").iterdir()) == []
