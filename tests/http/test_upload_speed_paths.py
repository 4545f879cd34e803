"""The fast paths of an upload: the body read from the server's own ``receive`` (past the
BaseHTTPMiddleware layers), multipart file data handed on as views of the body's chunks, and the
blob writer's threads. The bytes stored must be the bytes sent, however the body is cut into
messages, and a client that goes away mid-body leaves nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time

import torch

from ckptscope.http.uploads import SERVER_RECEIVE, UploadBodyPassage
from ckptscope.store.blobs import BATCH_BYTES
from tests import factories as f
from tests.helpers import make_client
from tests.servers import Server

BOUNDARY = "speed-paths-boundary"


def stored_file(client, checkpoint_id: str) -> dict:
    [one] = client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()["files"]
    return one


def big_safetensors(tmp_path):
    f.seeded(3)
    return f.save_safetensors({"w": torch.randn(3 * BATCH_BYTES // 4 + 999)}, tmp_path / "big.safetensors")


def multipart_body(data: bytes, name: str) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nlabel\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def cut(body: bytes, at: list[int]) -> list[bytes]:
    """The body cut at the given offsets (each piece one ASGI message)."""
    ends = [*sorted(at), len(body)]
    return [body[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def post_messages(
    client, path: str, query: str, content_type: str, messages: list[bytes], *, declared: bool = True
) -> tuple[int, dict]:
    """POST to the in-process app (on the test client's event loop) with the body as exactly these
    ASGI messages (the test client itself would join them into one); ``declared``: with a
    Content-Length."""

    async def run() -> tuple[int, dict]:
        pending = list(messages)
        sent: list[dict] = []

        async def receive() -> dict:
            if pending:
                return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"host", b"localhost"), (b"content-type", content_type.encode())]
        if declared:
            headers.append((b"content-length", str(sum(map(len, messages))).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("localhost", 80),
            "state": client.app_state.copy(),
        }
        await client.app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body)

    return client.portal.call(run)


def test_a_multipart_body_cut_anywhere_stores_the_exact_file(client, tmp_path):
    path = big_safetensors(tmp_path)
    data = path.read_bytes()
    body = multipart_body(data, path.name)
    closing = body.rindex(f"\r\n--{BOUNDARY}--".encode())
    # cuts inside a header, inside the file data, and inside the closing delimiter (the parser
    # then hands the file's last bytes from its look-behind of the boundary)
    at = [40, 150, len(body) // 3, closing + 3, closing + 9]
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    status, made = post_messages(client, "/api/v1/checkpoints", "", content_type, cut(body, at))
    assert status == 201, made
    assert made["name"] == "label"
    stored = stored_file(client, made["id"])
    assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["size"] == len(data)


def test_a_raw_body_in_uneven_messages_stores_the_exact_file(client, tmp_path):
    path = big_safetensors(tmp_path)
    data = path.read_bytes()
    at = list(range(1, len(data), 777_777))
    query = f"filename={path.name}"
    status, made = post_messages(client, "/api/v1/checkpoints", query, "application/octet-stream", cut(data, at))
    assert status == 201, made
    stored = stored_file(client, made["id"])
    assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["size"] == len(data)
    assert made["tensor_count"] == 1


def test_the_cap_refuses_a_body_of_many_messages_and_leaves_nothing(data_dir):
    with make_client(data_dir, max_upload_bytes=2 * BATCH_BYTES) as client:
        messages = [os.urandom(1 << 20)] * (3 * BATCH_BYTES >> 20)
        # no Content-Length: refused while streaming, batches already on the writer's threads
        status, problem = post_messages(
            client, "/api/v1/checkpoints", "filename=x", "application/octet-stream", messages, declared=False
        )
        assert status == 413 and problem["code"] == "too_large"
    assert list((data_dir / "tmp").iterdir()) == [] and list((data_dir / "blobs").rglob("*")) == []


def test_only_upload_routes_get_the_servers_receive():
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(scope)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    passage = UploadBodyPassage(app)
    for method, path in (("POST", "/api/v1/checkpoints"), ("POST", "/upload"), ("GET", "/api/v1/checkpoints")):
        asyncio.run(passage({"type": "http", "method": method, "path": path}, receive, None))
    assert [s.get(SERVER_RECEIVE) for s in seen] == [receive, receive, None]


def test_a_client_gone_mid_body_leaves_no_temp_file(tmp_path):
    data_dir = tmp_path / "data"
    server = Server(data_dir)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        head = (
            f"POST /api/v1/checkpoints?filename=gone.bin HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {8 * BATCH_BYTES}\r\n\r\n"
        )
        sock.sendall(head.encode() + os.urandom(3 * BATCH_BYTES))  # some batches on their threads
        tmp = data_dir / "tmp"
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size for p in tmp.glob("upload-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp.glob("upload-*")), "the upload never started writing"
        sock.close()
        while list(tmp.glob("upload-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp.glob("upload-*")) == []
        assert list((data_dir / "blobs").rglob("*")) == []
    finally:
        server.stop()
