"""Hostile HTTP: bodies over the cap (declared or chunked), unbounded lists and strings in the
operation requests, multipart uploads with too many parts, huge integers in query parameters,
foreign Host headers (DNS rebinding), cross-origin and token-less state-changing requests (CSRF),
and browser sessions that expire, end at logout and end with a new API token.

Each hostile request gets its exact status and problem ``code`` (or a readable page on a UI route),
runs nothing, leaves nothing behind, and the service answers ``/readyz`` afterwards. Where real HTTP
matters (the Host header, chunked bodies, HTTP/1.0) a real uvicorn answers."""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import select

from ckptscope.config import Settings
from ckptscope.formats.model import StorageRef, TensorInfo
from ckptscope.services.operations import PrefixSet, Renamer, copy_report, freeze_plan, plan_export
from ckptscope.services.selection import normalize_mapping, normalize_prefix, rename, under
from ckptscope.store.catalogue import LoginSession
from tests import factories as f
from tests.helpers import ROOT, csrf_token, database_env, make_client, models, upload
from tests.servers import Server

TOKEN = "edge-s3cret"
MiB = 1024**2


# --- helpers ---------------------------------------------------------------------------------


def leftovers(data_dir: Path) -> list[str]:
    """Temp files, blobs and pins in a data directory."""
    return sorted(
        str(p.relative_to(data_dir))
        for sub in ("tmp", "blobs", "pins")
        for p in (data_dir / sub).rglob("*")
        if p.is_file()
    )


def assert_problem(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text[:400]
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers["content-type"]
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["type"] == f"/problems/{code}", body


def assert_page(r, status: int, text: str) -> None:
    """A readable error page (UI routes)."""
    assert r.status_code == status, r.text[:400]
    assert r.headers["content-type"].startswith("text/html")
    assert text in html.unescape(r.text) and "Traceback" not in r.text


def assert_healthy(client) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "edgeboundary") -> tuple[bytes, dict]:
    """A multipart body with its parts in exactly this order: (field name, file name or None, value)."""
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture
def ckpt(client, tmp_path) -> str:
    """One stored checkpoint (TwoPart: nn_same.*, head.*)."""
    return upload(client, f.save_torch(models()[0].state_dict(), tmp_path / "a.pt")).json()["id"]


def count(client) -> int:
    return client.get("/api/v1/checkpoints").json()["total"]


# --- 1. request bodies -----------------------------------------------------------------------


def _op_path(route: str, cid: str) -> str:
    return {
        "freeze": f"/api/v1/checkpoints/{cid}/freeze-plan",
        "copy": "/api/v1/copy",
        "export": f"/api/v1/checkpoints/{cid}/export",
    }[route]


@pytest.mark.parametrize("route", ["freeze", "copy", "export"])
def test_a_declared_body_over_the_cap_is_refused_before_it_is_parsed(client, ckpt, data_dir, route):
    body = b"[" * (24 * MiB)  # parsed, this would be 24 Mi levels of JSON nesting
    started = time.perf_counter()
    r = client.post(_op_path(route, ckpt), content=body, headers={"content-type": "application/json"})
    assert_problem(r, 413, "body_too_large")
    assert "CKPTSCOPE_MAX_BODY_BYTES" in r.json()["detail"]
    assert time.perf_counter() - started < 5
    assert count(client) == 1 and len(leftovers(data_dir)) == 1  # nothing made
    assert_healthy(client)


@pytest.mark.parametrize("route", ["freeze", "copy", "export"])
def test_a_chunked_body_over_the_cap_is_refused_as_it_arrives(client, ckpt, route):
    def chunks():  # (the TestClient buffers them; the real server test below streams)
        for _ in range(24):
            yield b" " * MiB

    r = client.post(_op_path(route, ckpt), content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # chunked: only counting the bytes can stop it
    assert_problem(r, 413, "body_too_large")
    assert count(client) == 1
    assert_healthy(client)


def test_a_form_body_over_the_cap_gets_a_page(client, ckpt):
    token = csrf_token(client)
    r = client.post(f"/checkpoints/{ckpt}/freeze", data={"csrf_token": token, "module": "x" * (2 * MiB)})
    assert_page(r, 413, "CKPTSCOPE_MAX_BODY_BYTES")
    r = client.post("/login", data={"csrf_token": token, "token": "x" * (2 * MiB)})
    assert_page(r, 413, "CKPTSCOPE_MAX_BODY_BYTES")
    assert_healthy(client)


def test_the_body_cap_is_a_setting_and_uploads_keep_their_own(tmp_path):
    data = tmp_path / "data"
    path = f.save_safetensors({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")  # 16 KiB
    with make_client(data, max_body_bytes=1024) as c:
        assert upload(c, path).status_code == 201  # POST /api/v1/checkpoints: CKPTSCOPE_MAX_UPLOAD_BYTES
        with path.open("rb") as fh:  # POST /upload too
            r = c.post("/upload", files={"file": ("w2.safetensors", fh)}, headers={"x-csrf-token": csrf_token(c)})
        assert r.status_code == 200, r.text  # the UI's upload answers with the checkpoint page
        cid = upload(c, path).json()["id"]
        big = {"freeze": ["w"] * 300}  # ~1.5 KB of JSON
        assert_problem(c.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json=big), 413, "body_too_large")
        small = c.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json={"freeze": ["w"]})
        assert small.status_code == 200 and small.json()["frozen"] == ["w"]
        assert count(c) == 3
        assert_healthy(c)


# --- 1. bounded lists, strings and prefix work ------------------------------------------------


def _hostile_bodies(cid: str) -> list[tuple[str, dict]]:
    many = [f"m{i}" for i in range(10_001)]
    long = "x" * 4097
    return [
        ("freeze", {"freeze": many}),
        ("freeze", {"freeze": [long]}),
        ("freeze", {"freeze": ["a"], "root": long}),
        ("export", {"include": many}),
        ("export", {"exclude": many}),
        ("export", {"freeze": many}),
        ("export", {"rename": dict.fromkeys(many, "")}),
        ("export", {"rename": {long: ""}}),
        ("export", {"rename": {"a": long}}),
        ("copy", {"source": cid, "target": cid, "mapping": dict.fromkeys(many, "x")}),
        ("copy", {"source": long, "target": cid, "mapping": {"a": "a"}}),
        ("copy", {"source": cid, "target": cid, "mapping": {"a": "a"}, "target_root": long}),
    ]


@pytest.mark.parametrize("case", range(12))
def test_lists_and_strings_in_operation_requests_are_bounded(client, ckpt, case):
    route, body = _hostile_bodies(ckpt)[case]
    r = client.post(_op_path(route, ckpt), json=body)
    assert_problem(r, 422, "validation")
    assert len(r.json()["errors"]) <= 20 and len(r.text) < 20_000  # the report is bounded too
    assert count(client) == 1
    assert_healthy(client)


def test_ten_thousand_prefixes_are_answered(client, ckpt):
    prefixes = ["nn_same.0", *(f"nope{i}" for i in range(9_999))]
    r = client.post(f"/api/v1/checkpoints/{ckpt}/freeze-plan", json={"freeze": prefixes})
    assert r.status_code == 200, r.text
    assert r.json()["frozen"] == ["nn_same.0.weight", "nn_same.0.bias"]
    assert len(r.json()["unmatched_prefixes"]) == 9_999


def _listing(n: int) -> list[TensorInfo]:
    ref = StorageRef("/nonexistent", 0, 4, "0")
    return [TensorInfo(f"layers.{i}.block.weight", "float32", (1,), (1,), 0, ref) for i in range(n)]


def test_prefix_matching_costs_the_names_not_prefixes_times_tensors():
    """10,000 prefixes over 50,000 tensors: 5e8 comparisons by brute force, here about one lookup
    per name segment."""
    tensors = _listing(50_000)
    prefixes = [f"layers.{i}.block" for i in range(0, 20_000, 2)]
    started = time.perf_counter()
    plan = freeze_plan(tensors, prefixes)
    outputs = plan_export(
        tensors, include=prefixes, exclude=prefixes[:5_000], rename_map={p: f"x.{p}" for p in prefixes}
    )
    report = copy_report(tensors, tensors, {p: p for p in prefixes})
    elapsed = time.perf_counter() - started
    assert len(plan.frozen) == 10_000 and not plan.unmatched_prefixes
    assert len(outputs) == 5_000 and outputs[0].name == "x.layers.10000.block.weight"
    assert len(report.copied) == 10_000 and not report.missing
    assert elapsed < 10, elapsed


def test_prefixes_times_tensors_through_the_api(client, tmp_path):
    path = f.save_safetensors({f"layers.{i}.w": torch.zeros(1) for i in range(5_000)}, tmp_path / "many.safetensors")
    cid = upload(client, path).json()["id"]
    prefixes = [f"layers.{i}" for i in range(0, 10_000)]  # half of them match
    started = time.perf_counter()
    r = client.post(f"/api/v1/checkpoints/{cid}/freeze-plan", json={"freeze": prefixes})
    assert r.status_code == 200 and len(r.json()["frozen"]) == 5_000
    r = client.post(f"/api/v1/checkpoints/{cid}/export", json={"include": prefixes, "exclude": prefixes[:2_500]})
    assert r.status_code == 201 and r.json()["tensor_count"] == 2_500
    assert time.perf_counter() - started < 15  # brute force: 7.5e7 comparisons, 30 s here


_names = st.text(alphabet="ab.", max_size=7)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(names=st.lists(_names, max_size=8), prefixes=st.lists(_names, max_size=6))
def test_the_prefix_trie_means_what_under_and_rename_mean(names, prefixes):
    normalized = [normalize_prefix(p) for p in prefixes]
    trie = PrefixSet(normalized)
    mapping = normalize_mapping({p: f"n{i}." for i, p in enumerate(prefixes)})
    renamer = Renamer(mapping)
    for name in names:
        assert set(trie.hits(name)) == {p for p in normalized if under(name, p)}
        assert trie.matches(name) == any(under(name, p) for p in normalized)
        assert renamer(name) == rename(name, mapping)


# --- 1. multipart shape ----------------------------------------------------------------------


def test_an_upload_with_too_many_parts_is_refused_and_leaves_nothing(client, data_dir):
    files = [("file", (f"model-{i:05d}.safetensors", b"x")) for i in range(1_001)]
    r = client.post("/api/v1/checkpoints", files=files)
    assert_problem(r, 413, "too_many_parts")
    assert leftovers(data_dir) == [] and count(client) == 0
    body, headers = multipart([*((f"field{i}", None, b"v") for i in range(1_001)), ("file", "a.pt", b"x")])
    assert_problem(client.post("/api/v1/checkpoints", content=body, headers=headers), 413, "too_many_parts")
    assert leftovers(data_dir) == [] and count(client) == 0
    assert_healthy(client)


def test_a_part_with_too_many_headers_is_refused(client, data_dir):
    """(python-multipart allows 8 headers a part; each is at most 4 KiB, FIELD_LIMIT)"""
    headers = "".join(f"X-H{i}: v\r\n" for i in range(40))
    body = (
        f'--b\r\nContent-Disposition: form-data; name="file"; filename="a.pt"\r\n{headers}\r\nxx\r\n--b--\r\n'
    ).encode()
    r = client.post("/api/v1/checkpoints", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_problem(r, 400, "bad_multipart")
    assert leftovers(data_dir) == [] and count(client) == 0
    assert_healthy(client)


# --- 2. integers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "tensors?offset=100000000000000000000",
        f"tensors?offset={2**63}",
        f"tensors?offset={2**63 - 1}",
        "tensors?offset=1000000001",
        "tensors?offset=-1",
        "tensors?limit=100000000000000000000",
        "tensors?limit=0",
        "tree?depth=100000000000000000000",
        f"tree?depth={2**63}",
        "tree?depth=-1",
    ],
)
def test_huge_integers_in_api_queries_are_422(client, ckpt, query):
    r = client.get(f"/api/v1/checkpoints/{ckpt}/{query}")
    assert_problem(r, 422, "validation")
    assert r.json()["errors"][0]["loc"][0] == "query"
    assert_healthy(client)


def test_the_largest_allowed_integers_answer(client, ckpt):
    r = client.get(f"/api/v1/checkpoints/{ckpt}/tensors", params={"offset": 1_000_000_000, "limit": 5000})
    assert r.status_code == 200 and r.json()["tensors"] == []
    assert client.get(f"/api/v1/checkpoints/{ckpt}/tree", params={"depth": 10_000}).status_code == 200
    r = client.get(f"/checkpoints/{ckpt}", params={"page": 10_000_000})
    assert r.status_code == 200 and "No tensor matches" not in r.text  # past the end: the last page


@pytest.mark.parametrize("page", [10**20, 2**63, 10_000_001, 0, -5])
def test_huge_page_numbers_get_a_readable_page(client, ckpt, page):
    r = client.get(f"/checkpoints/{ckpt}?page={page}")
    assert_page(r, 422, "page")
    assert_healthy(client)


# --- 3. Host header --------------------------------------------------------------------------

FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8000",
    "localhost.evil.example",
    "127.0.0.1.nip.io",
    "[::2]:8000",
    "0.0.0.0",
    "localhost:notaport",
    "localhost:99999",
    "local host",
    "[::1",
    "",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_foreign_or_malformed_hosts_are_refused(client, ckpt, data_dir, tmp_path, host):
    assert_problem(client.get("/api/v1/checkpoints", headers={"host": host}), 400, "bad_host")
    assert_problem(client.delete(f"/api/v1/checkpoints/{ckpt}", headers={"host": host}), 400, "bad_host")
    assert_page(client.get("/", headers={"host": host}), 400, "CKPTSCOPE_ALLOWED_HOSTS")
    path = f.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert_problem(upload(client, path, headers={"host": host}), 400, "bad_host")
    assert count(client) == 1 and len(leftovers(data_dir)) == 1
    assert_healthy(client)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LocalHost.", "127.0.0.1", "127.0.0.1:1", "[::1]:80"])
def test_loopback_names_are_served_by_default(client, host):
    assert client.get("/api/v1/checkpoints", headers={"host": host}).status_code == 200


def test_healthz_answers_any_host_for_container_health_checks(client):
    assert client.get("/healthz", headers={"host": "container-id"}).status_code == 200
    assert_problem(client.get("/readyz", headers={"host": "container-id"}), 400, "bad_host")


def test_allowed_hosts_are_configurable(tmp_path):
    with make_client(tmp_path / "a", allowed_hosts="ckpt.example.com, [fd00::5]") as c:
        assert c.get("/api/v1/checkpoints", headers={"host": "ckpt.example.com:443"}).status_code == 200
        assert c.get("/api/v1/checkpoints", headers={"host": "[FD00::5]:8000"}).status_code == 200
        assert_problem(c.get("/api/v1/checkpoints", headers={"host": "localhost"}), 400, "bad_host")
    with make_client(tmp_path / "b", allowed_hosts="*") as c:
        assert c.get("/api/v1/checkpoints", headers={"host": "anything.example"}).status_code == 200


def test_allowed_hosts_setting_is_parsed_and_validated(monkeypatch):
    assert Settings().allowed_host_names == {"localhost", "127.0.0.1", "::1"}
    assert Settings(allowed_hosts=" Example.COM ,[::1],10.0.0.7,").allowed_host_names == {
        "example.com",
        "::1",
        "10.0.0.7",
    }
    assert Settings(allowed_hosts="a.example,*").allowed_host_names is None
    for bad in ("", " , ", "example.com:8000", "exa mple.com", "http://example.com", "[::1]:80", "-x.example"):
        monkeypatch.setenv("CKPTSCOPE_ALLOWED_HOSTS", bad)
        with pytest.raises(ValidationError):
            Settings()


@pytest.mark.parametrize(
    ("variable", "value"), [("MAX_BODY_BYTES", "0"), ("SESSION_TTL_S", "0"), ("SESSION_TTL_S", "-5")]
)
def test_new_settings_are_validated(monkeypatch, variable, value):
    monkeypatch.setenv(f"CKPTSCOPE_{variable}", value)
    with pytest.raises(ValidationError):
        Settings()


def test_serve_names_a_bad_allowed_hosts_setting_in_one_line(tmp_path):
    env = {**os.environ, "CKPTSCOPE_DATA_DIR": str(tmp_path), "CKPTSCOPE_ALLOWED_HOSTS": "example.com:80"}
    r = subprocess.run(
        [sys.executable, "-m", "ckptscope.cli", "serve", "--port", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "CKPTSCOPE_ALLOWED_HOSTS" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- 4. cross-origin state changes ------------------------------------------------------------

CROSS_ORIGIN = [
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},  # a sibling subdomain or another port: SameSite cookies go along
    {"origin": "http://evil.example"},
    {"origin": "http://localhost:8001"},  # another port of this host
    {"origin": "https://localhost"},  # another scheme
    {"origin": "http://sub.localhost"},
    {"origin": "null"},
    {"origin": "http://localhost", "sec-fetch-site": "cross-site"},
]


@pytest.mark.parametrize("headers", CROSS_ORIGIN, ids=lambda h: " ".join(f"{k}={v}" for k, v in h.items()))
def test_cross_origin_state_changes_are_refused(client, ckpt, data_dir, tmp_path, headers):
    token = csrf_token(client)
    path = f.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    assert_problem(client.delete(f"/api/v1/checkpoints/{ckpt}", headers=headers), 403, "cross_origin")
    copy = {"source": ckpt, "target": ckpt, "mapping": {"head": "head"}}
    assert_problem(client.post("/api/v1/copy", json=copy, headers=headers), 403, "cross_origin")
    assert_problem(client.post(f"/api/v1/checkpoints/{ckpt}/export", json={}, headers=headers), 403, "cross_origin")
    assert_problem(upload(client, path, headers=headers), 403, "cross_origin")
    with_token = {**headers, "x-csrf-token": token}  # the token does not excuse another origin
    with path.open("rb") as fh:
        assert_page(client.post("/upload", files={"file": ("w.pt", fh)}, headers=with_token), 403, "another")
    assert_page(client.delete(f"/checkpoints/{ckpt}", headers=with_token), 403, "another")
    form = {"module": "head", "csrf_token": token}
    assert_page(client.post(f"/checkpoints/{ckpt}/export", data=form, headers=headers), 403, "another")
    assert_page(client.post("/login", data={"token": "t", "csrf_token": token}, headers=headers), 403, "another")
    assert_page(client.post("/logout", data={"csrf_token": token}, headers=headers), 403, "another")
    assert count(client) == 1 and len(leftovers(data_dir)) == 1
    assert client.get("/api/v1/checkpoints", headers=headers).status_code == 200  # reading is not refused
    assert_healthy(client)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, scripts
        {"sec-fetch-site": "same-origin", "origin": "http://localhost"},
        {"sec-fetch-site": "none"},  # typed into the address bar
        {"origin": "http://LOCALHOST:80"},
    ],
)
def test_same_origin_and_headerless_state_changes_pass(client, ckpt, headers):
    r = client.post(f"/api/v1/checkpoints/{ckpt}/freeze-plan", json={"freeze": ["head"]}, headers=headers)
    assert r.status_code == 200
    assert client.delete(f"/api/v1/checkpoints/{ckpt}", headers=headers).status_code == 204


# --- 4. the UI's anti-CSRF token -------------------------------------------------------------


def _ui_requests(cid: str, token: str | None) -> list[tuple[str, str, dict]]:
    field = {"csrf_token": token} if token is not None else {}
    return [
        ("DELETE", f"/checkpoints/{cid}", {"headers": {"x-csrf-token": token} if token is not None else {}}),
        ("POST", f"/checkpoints/{cid}/freeze", {"data": {"module": "head", **field}}),
        ("POST", f"/checkpoints/{cid}/export", {"data": {"module": "head", **field}}),
        ("POST", f"/checkpoints/{cid}/copy", {"data": {"module": "head", "target": cid, "action": "copy", **field}}),
        ("POST", "/upload", {"files": {"file": ("w.pt", b"junk")}, "data": field}),
        ("POST", "/logout", {"data": field}),
    ]


def test_ui_state_changes_need_the_anti_csrf_token(client, ckpt, data_dir):
    for method, path, kwargs in _ui_requests(ckpt, None):  # no cookie, no token
        assert_page(client.request(method, path, **kwargs), 403, "anti-CSRF token")
    token = csrf_token(client)
    for wrong in ("", "x" * 43, token[:-1] + ("A" if token[-1] != "A" else "B")):
        for method, path, kwargs in _ui_requests(ckpt, wrong):
            assert_page(client.request(method, path, **kwargs), 403, "anti-CSRF token")
    for method, path, kwargs in _ui_requests(ckpt, token):  # a right token without its cookie is not enough
        client.cookies.clear()
        assert_page(client.request(method, path, **kwargs), 403, "anti-CSRF token")
    r = client.post(f"/checkpoints/{ckpt}/freeze", data={"module": "head"}, headers={"hx-request": "true"})
    assert r.status_code == 403 and "<html" not in r.text and "anti-CSRF" in r.text  # htmx: the message fragment
    assert count(client) == 1 and len(leftovers(data_dir)) == 1
    assert_healthy(client)


def test_ui_state_changes_with_the_token_work(client, ckpt):
    token = csrf_token(client)
    r = client.post(f"/checkpoints/{ckpt}/freeze", data={"module": "head", "csrf_token": token})
    assert r.status_code == 200 and "Freeze plan" in r.text
    r = client.post(f"/checkpoints/{ckpt}/freeze", data={"module": "head"}, headers={"x-csrf-token": token})
    assert r.status_code == 200
    r = client.post(f"/checkpoints/{ckpt}/export", data={"module": "head", "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and count(client) == 2
    r = client.delete(f"/checkpoints/{ckpt}", headers={"x-csrf-token": token, "hx-request": "true"})
    assert r.status_code == 200 and count(client) == 1


def test_a_plain_upload_form_sends_the_token_before_its_files(client, data_dir, tmp_path):
    token = csrf_token(client)
    data = f.save_safetensors({"w": torch.ones(4)}, tmp_path / "w.safetensors").read_bytes()
    late, headers = multipart([("file", "w.safetensors", data), ("csrf_token", None, token.encode())])
    assert_page(client.post("/upload", content=late, headers=headers), 403, "anti-CSRF token")
    assert leftovers(data_dir) == [] and count(client) == 0  # refused before the file was written
    wrong, headers = multipart([("csrf_token", None, b"wrong" * 9), ("file", "w.safetensors", data)])
    assert_page(client.post("/upload", content=wrong, headers=headers), 403, "anti-CSRF token")
    raw = client.post("/upload", content=data, headers={"content-type": "application/octet-stream"})
    assert_page(raw, 403, "anti-CSRF token")
    assert leftovers(data_dir) == [] and count(client) == 0
    first, headers = multipart([("csrf_token", None, token.encode()), ("file", "w.safetensors", data)])
    r = client.post("/upload", content=first, headers=headers, follow_redirects=False)
    assert r.status_code == 303 and count(client) == 1
    htmx = client.post(
        "/upload", files={"file": ("w.safetensors", data)}, headers={"x-csrf-token": token, "hx-request": "true"}
    )
    assert htmx.status_code == 200 and htmx.headers["hx-redirect"].startswith("/checkpoints/")
    bad_header = {"x-csrf-token": "nope" * 11}  # a wrong header is refused even beside a right field
    r = client.post("/upload", files={"file": ("w.safetensors", data)}, data={"csrf_token": token}, headers=bad_header)
    assert_page(r, 403, "anti-CSRF token")
    assert count(client) == 2
    assert_healthy(client)


def test_pages_carry_the_token_in_their_forms_and_htmx_headers(client, ckpt):
    client.cookies.clear()
    home = client.get("/")
    token = client.cookies["ckptscope_csrf"]
    cookie = home.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert f"""<body hx-headers='{{"X-CSRF-Token": "{token}"}}'>""" in home.text
    field = f'name="csrf_token" value="{token}"'
    assert home.text.index(field) < home.text.index('type="file"')  # before the files: see the upload test
    page = client.get(f"/checkpoints/{ckpt}")
    assert field in page.text.split('id="ops-form"')[1].split("</form>")[0]
    assert "set-cookie" not in page.headers  # the browser keeps its token
    client.cookies.clear()
    assert "set-cookie" not in client.get("/api/v1/checkpoints").headers  # the API needs none


# --- 5. sessions -----------------------------------------------------------------------------


def login(c) -> str:
    r = c.post("/login", data={"token": TOKEN, "next": "/", "csrf_token": csrf_token(c)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return c.cookies["ckptscope_session"]


def session_rows(c) -> list[LoginSession]:
    with c.app.state.core.catalogue.session() as s:
        return list(s.scalars(select(LoginSession)))


def with_cookie(session_id: str) -> dict[str, str]:
    return {"cookie": f"ckptscope_session={session_id}"}


def test_sessions_are_random_stored_hashed_and_revoked_at_logout(data_dir):
    with make_client(data_dir, api_token=TOKEN) as c:
        first = login(c)
        c.cookies.clear()
        second = login(c)
        assert first != second and len(first) >= 43
        rows = session_rows(c)
        assert {r.id_hash for r in rows} == {hashlib.sha256(s.encode()).hexdigest() for s in (first, second)}
        assert not any(TOKEN in (r.id_hash + r.token_fingerprint) for r in rows)
        home = c.get("/").text  # logged in: the page offers a logout form that carries the token
        logout_form = home.split('action="/logout"')[1].split("</form>")[0]
        assert f'name="csrf_token" value="{c.cookies["ckptscope_csrf"]}"' in logout_form
        c.cookies.clear()
        assert c.get("/api/v1/checkpoints", headers=with_cookie(first)).status_code == 200
        c.cookies.set("ckptscope_session", second)
        r = c.post("/logout", data={"csrf_token": csrf_token(c)}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert len(session_rows(c)) == 1  # the other login stays
        c.cookies.clear()
        assert_problem(c.get("/api/v1/checkpoints", headers=with_cookie(second)), 401, "unauthorized")
        r = c.get("/", headers=with_cookie(second), follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert c.get("/api/v1/checkpoints", headers=with_cookie(first)).status_code == 200


def test_the_old_fixed_session_cookie_opens_nothing(data_dir):
    legacy = hmac.new(TOKEN.encode(), b"ckptscope-session-v1", hashlib.sha256).hexdigest()
    with make_client(data_dir, api_token=TOKEN) as c:
        for forged in (legacy, "A" * 43, "x", "", "../" * 20):
            assert_problem(c.get("/api/v1/checkpoints", headers=with_cookie(forged)), 401, "unauthorized")
        assert_healthy(c)


def test_sessions_expire_and_expired_rows_go_at_the_next_login(data_dir):
    with make_client(data_dir, api_token=TOKEN, session_ttl_s=1) as c:
        old = login(c)
        c.cookies.clear()
        assert c.get("/api/v1/checkpoints", headers=with_cookie(old)).status_code == 200
        time.sleep(1.3)
        assert_problem(c.get("/api/v1/checkpoints", headers=with_cookie(old)), 401, "unauthorized")
        login(c)
        assert len(session_rows(c)) == 1  # the expired one was deleted


def test_login_sets_a_session_cookie_that_lives_as_long_as_the_session(data_dir):
    with make_client(data_dir, api_token=TOKEN, session_ttl_s=90) as c:
        before = csrf_token(c)
        r = c.post("/login", data={"token": TOKEN, "next": "/", "csrf_token": before}, follow_redirects=False)
        cookies = {v.split("=", 1)[0]: v for v in r.headers.get_list("set-cookie")}
        session = cookies["ckptscope_session"]
        assert "Max-Age=90" in session and "HttpOnly" in session and "SameSite=strict" in session
        assert "HttpOnly" in cookies["ckptscope_csrf"] and before not in cookies["ckptscope_csrf"]  # a new token


def test_processes_share_sessions_and_a_new_token_ends_them(data_dir):
    with make_client(data_dir, api_token=TOKEN) as a:
        session_id = login(a)
    with make_client(data_dir, api_token=TOKEN) as b:  # another process on the same catalogue
        assert b.get("/api/v1/checkpoints", headers=with_cookie(session_id)).status_code == 200
    with make_client(data_dir, api_token="a-new-token") as c:
        assert_problem(c.get("/api/v1/checkpoints", headers=with_cookie(session_id)), 401, "unauthorized")
        r = c.get("/", headers=with_cookie(session_id), follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert_healthy(c)


def test_logging_in_again_replaces_the_browsers_session(data_dir):
    with make_client(data_dir, api_token=TOKEN) as c:
        first = login(c)
        second = login(c)  # the same browser, its cookie still set
        assert first != second and len(session_rows(c)) == 1
        c.cookies.clear()
        assert_problem(c.get("/api/v1/checkpoints", headers=with_cookie(first)), 401, "unauthorized")
        assert c.get("/api/v1/checkpoints", headers=with_cookie(second)).status_code == 200


def test_the_pre_login_anti_csrf_token_dies_at_login(data_dir):
    with make_client(data_dir, api_token=TOKEN) as c:
        before = csrf_token(c)
        login(c)
        after = c.cookies["ckptscope_csrf"]
        assert after != before
        assert_page(c.post("/logout", data={"csrf_token": before}, follow_redirects=False), 403, "anti-CSRF token")
        assert c.post("/logout", data={"csrf_token": after}, follow_redirects=False).status_code == 303
        assert session_rows(c) == []


# --- a real uvicorn: Host headers, HTTP/1.0, chunked and declared bodies ------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("edges") / "data"
    srv = Server(data, database_env())
    yield srv
    assert srv.terminate()
    assert "Traceback" not in srv.log()


def exchange(port: int, head: bytes, chunks=(), timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP exchange: the head, then the body chunks (sent from a thread while the answer is
    read: the server may answer and close before the body is through)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head)

    def pump() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: what it did not read, it refused

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    finally:
        sock.close()
        sender.join(10)
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 62


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))


def _problem_code(body: bytes) -> str:
    import json

    return json.loads(body)["code"]


@pytest.mark.e2e
def test_a_real_server_answers_only_to_its_names(live):
    port = live.port
    for host in ("evil.example", f"evil.example:{port}", "attacker.test", f"127.0.0.1.nip.io:{port}"):
        status, headers, body = exchange(port, f"GET /api/v1/checkpoints HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status == 400 and headers["content-type"].startswith("application/problem+json")
        assert _problem_code(body) == "bad_host"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        status, _, _ = exchange(port, f"GET /api/v1/checkpoints HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert status == 200, host
    status, _, body = exchange(port, b"GET /api/v1/checkpoints HTTP/1.0\r\n\r\n")  # HTTP/1.0: no Host at all
    assert status == 400 and _problem_code(body) == "bad_host"
    status, _, body = exchange(port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert status == 400 and b"CKPTSCOPE_ALLOWED_HOSTS" in body and b"<html" in body
    assert live.request("GET", "/readyz")[0] == 200


@pytest.mark.e2e
def test_a_real_server_refuses_big_bodies_declared_or_chunked(live):
    port = live.port
    baseline = _rss_kib(live.proc.pid)
    host = f"Host: 127.0.0.1:{port}\r\n"
    declared = (
        f"POST /api/v1/copy HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: {24 * MiB}\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    status, _, body = exchange(port, declared, [b"[" * MiB] * 24)
    assert status == 413 and _problem_code(body) == "body_too_large"
    path = "/api/v1/checkpoints/x/freeze-plan"
    chunked = (
        f"POST {path} HTTP/1.1\r\n{host}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"[" * (256 * 1024)
    status, _, body = exchange(port, chunked, [b"%x\r\n%s\r\n" % (len(piece), piece)] * 96 + [b"0\r\n\r\n"])
    assert status == 413 and _problem_code(body) == "body_too_large"
    assert time.perf_counter() - started < 20
    assert _rss_kib(live.proc.pid) - baseline < 64 * 1024  # nothing like the 24 MiB x JSON blow-up
    assert live.request("GET", "/readyz")[0] == 200
    # under the cap, the same route parses and answers
    status, body = live.request("POST", "/api/v1/copy", b'{"source": "a"}', {"Content-Type": "application/json"})
    assert status == 422 and body["code"] == "validation"
