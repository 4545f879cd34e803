"""The upload route's multipart parsing (``receive_uploads``), body by body: the parts it yields do
not depend on how the body is cut into ASGI messages (a delimiter split across messages included),
boundary-like bytes that are not a delimiter stay file data, and hostile bodies give the errors the
route maps to problem+json, leaving no temp file behind. Ends with a real upload through uvicorn."""

from __future__ import annotations

import hashlib
import random

import httpx
import pytest
import torch
from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ckptscope.errors import Invalid
from ckptscope.http.problems import Refused
from ckptscope.http.uploads import FIELD_LIMIT, MAX_PARTS, SERVER_RECEIVE, receive_uploads
from ckptscope.services.checkpoints import release_blobs
from tests import factories as f
from tests.servers import Server

B = "stream-boundary-7f3a"
CT = f"multipart/form-data; boundary={B}"

# file data that holds everything a delimiter scan could mistake for a delimiter
TRICKY = (
    b"\x00start\r\n--" + B.encode() + b"X not a delimiter\n"  # a longer boundary-like token
    b"--" + B.encode() + b"\r\n"  # the boundary after a bare LF, not a CRLF
    b"x--" + B.encode() + b"\r\n"  # and after another byte
    b"\r\n--" + B.encode() + b"-x\r\n"  # a delimiter followed by one hyphen only
    b"\r\n--" + B.encode() + b"\rY"  # a CR not followed by LF
    b"\r\r\n\r\n-\r\n--"
    + B.encode()[:-1]
    + b"\r\n"  # a delimiter's prefix
    + bytes(range(256)) * 3
    + b"\r"  # the file ends in a CR, right before the real delimiter
)


def part(name: str, value: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{B}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + value + b"\r\n"


def body_of(*parts: bytes, close: bytes = f"--{B}--\r\n".encode()) -> bytes:
    return b"".join(parts) + close


SAMPLE = body_of(
    part("name", b"label"),
    part("file", TRICKY, "a.bin", "Content-Type: application/octet-stream\r\n"),
    part("note", b"two\r\nlines --" + B.encode()),
    part("file", b"second file \r\n-- " + B.encode(), "b.bin"),
    close=f"--{B}--\r\nepilogue, ignored\r\n--{B}--".encode(),
)


def cut(body: bytes, at: list[int]) -> list[bytes]:
    ends = [*sorted(at), len(body)]
    return [body[s:e] for s, e in zip([0, *ends[:-1]], ends, strict=True)]


def request_of(messages: list[bytes], content_type: str = CT) -> Request:
    pending = list(messages)

    async def receive() -> dict:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/checkpoints",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode())],
        SERVER_RECEIVE: receive,
    }
    return Request(scope, receive)


def parse(client, messages: list[bytes], content_type: str = CT, csrf_token: str | None = None):
    """What the route gets from these messages: ([(file name, sha256, size)], fields), the blobs
    released again; or the exception it raised."""
    core = client.app.state.core

    async def run():
        try:
            uploads, fields = await receive_uploads(
                core, request_of(messages, content_type), None, csrf_token=csrf_token
            )
        except Exception as exc:  # the test compares the exception itself
            return exc
        await run_in_threadpool(release_blobs, core, [u.blob for u in uploads])
        return [(u.name, u.blob.sha256, u.blob.size) for u in uploads], fields

    return client.portal.call(run)


def expected_sample():
    files = [("a.bin", TRICKY), ("b.bin", b"second file \r\n-- " + B.encode())]
    return (
        [(name, hashlib.sha256(data).hexdigest(), len(data)) for name, data in files],
        {"name": "label", "note": "two\r\nlines --" + B},
    )


def no_temp_files(client) -> bool:
    return list((client.app.state.core.settings.data_dir / "tmp").glob("upload-*")) == []


def test_the_sample_body_in_one_message(client):
    assert parse(client, [SAMPLE]) == expected_sample()


def test_the_parts_do_not_depend_on_where_the_body_is_cut(client):
    """One cut at every offset (each delimiter split across two messages at each of its bytes)."""
    expected = expected_sample()
    for at in range(1, len(SAMPLE)):
        assert parse(client, cut(SAMPLE, [at])) == expected, at
    assert no_temp_files(client)


def test_the_parts_do_not_depend_on_random_cuts_or_one_byte_messages(client):
    expected = expected_sample()
    rng = random.Random(7)
    for _ in range(40):
        at = rng.sample(range(1, len(SAMPLE)), rng.randint(2, 60))
        assert parse(client, cut(SAMPLE, at)) == expected, at
    assert parse(client, [SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == expected
    assert parse(client, [b"", *cut(SAMPLE, [10, 10, 500]), b""]) == expected  # empty messages too


def test_a_preamble_after_a_leading_crlf_and_an_empty_form(client):
    assert parse(client, [b"\r\n" + SAMPLE]) == expected_sample()
    assert parse(client, [b"\r\nsome preamble text\r\n" + SAMPLE]) == expected_sample()
    assert parse(client, [f"--{B}--\r\n".encode()]) == ([], {})


def test_transport_padding_after_a_delimiter(client):
    body = body_of(part("name", b"x"), part("file", b"data", "a.bin")).replace(
        f"\r\n--{B}\r\n".encode(), f"\r\n--{B} \t \r\n".encode()
    )
    assert parse(client, cut(body, [len(body) // 2])) == (
        [("a.bin", hashlib.sha256(b"data").hexdigest(), 4)],
        {"name": "x"},
    )


@pytest.mark.parametrize(
    "body",
    [
        body_of(part("file", b"data", "a.bin"), close=b"")[:-2],  # no closing delimiter at all
        body_of(part("file", b"data", "a.bin"), close=f"--{B}".encode())[:-2],  # cut inside it
        body_of(part("file", b"data", "a.bin"), close=b"")[:-2] + f"\r\n--{B}-".encode(),
        f'--{B}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode(),
    ],
)
def test_a_body_that_ends_inside_a_file_part_is_refused(client, body):
    for messages in ([body], cut(body, [len(body) // 2])):
        exc = parse(client, messages)
        assert isinstance(exc, Invalid) and str(exc.detail) == "multipart body ended inside a file part", exc
    assert no_temp_files(client)


@pytest.mark.parametrize(
    ("body", "kind", "text"),
    [
        # a header value longer than FIELD_LIMIT, its line within python-multipart's 4 KiB + 128
        (part("file", b"x", "a", "X-Long: " + "v" * (FIELD_LIMIT + 1) + "\r\n"), Invalid, "multipart header too long"),
        # a line over that: python-multipart's limit, or FIELD_LIMIT first where the value comes in
        # pieces (python-multipart hands a header's bytes on at each message's end)
        (
            part("file", b"x", "a", "X-Long: " + "v" * 5000 + "\r\n"),
            (MultipartParseError, Invalid),
            ("Maximum header size", "multipart header too long"),
        ),
        (part("file", b"x", "a", "".join(f"X-H{i}: v\r\n" for i in range(8))), MultipartParseError, "header count"),
        (part("file", b"x", "a", "Bad Header: v\r\n"), MultipartParseError, "invalid character"),
        (part("file", b"x", "a", "X-H: v\rX\n"), MultipartParseError, "Did not find LF"),
        (part("big", b"v" * (FIELD_LIMIT + 1)), Invalid, "form field 'big' is too long"),
        (part("upload", b"x", "a.bin"), Invalid, "unexpected file field 'upload'"),
    ],
)
def test_hostile_bodies_give_the_routes_errors_and_leave_nothing(client, body, kind, text):
    full = body_of(part("name", b"before"), part("file", b"committed", "ok.bin"), body)
    for messages in (
        [full],
        cut(full, [len(full) - len(body) + 30]),
        [full[i : i + 7] for i in range(0, len(full), 7)],
    ):
        exc = parse(client, messages)
        assert isinstance(exc, kind), exc
        said = str(getattr(exc, "detail", exc))
        assert any(t in said for t in ((text,) if isinstance(text, str) else text)), exc
    assert no_temp_files(client)
    assert list((client.app.state.core.settings.data_dir / "blobs").rglob("*")) == []


@pytest.mark.parametrize(
    ("start", "text"),
    [
        (f"--{B}X\r\n", "Did not find CR at end of boundary"),
        (f"--{B}\rX", "Did not find LF at end of boundary"),
        (f"-x{B}\r\n", "Expected boundary character"),
        ("preamble without a leading CRLF\r\n", "Expected boundary character"),
        (f"--{B}-x", "Did not find - at end of boundary"),
    ],
)
def test_a_body_that_does_not_open_with_the_boundary_is_malformed(client, start, text):
    body = start.encode() + SAMPLE
    for messages in ([body], [body[i : i + 3] for i in range(0, len(body), 3)]):
        exc = parse(client, messages)
        assert isinstance(exc, MultipartParseError) and text in str(exc), exc
    assert no_temp_files(client)


def test_too_many_parts_are_refused(client):
    fields = b"".join(part(f"f{i}", b"v") for i in range(MAX_PARTS + 1))
    for body in (body_of(fields, part("file", b"x", "a.bin")), body_of(part("file", b"x", "a.bin"), fields)):
        exc = parse(client, cut(body, [len(body) // 3]))
        assert isinstance(exc, Refused) and exc.status_code == 413 and exc.code == "too_many_parts"
    assert no_temp_files(client)
    assert list((client.app.state.core.settings.data_dir / "blobs").rglob("*")) == []


def test_a_part_without_content_disposition_is_a_nameless_field(client):
    body = body_of(f"--{B}\r\nContent-Type: text/plain\r\n\r\nvalue\r\n".encode(), part("file", b"d", "a.bin"))
    assert parse(client, [body]) == ([("a.bin", hashlib.sha256(b"d").hexdigest(), 1)], {"": "value"})


def test_a_boundary_is_required(client):
    exc = parse(client, [SAMPLE], "multipart/form-data")
    assert isinstance(exc, Invalid) and str(exc.detail) == "multipart request without a boundary"
    exc = parse(client, [SAMPLE], 'multipart/form-data; boundary=""')
    assert isinstance(exc, Invalid) and str(exc.detail) == "multipart request without a boundary"


def test_a_quoted_boundary_and_the_csrf_field_before_the_files(client):
    token = "t" * 40
    body = body_of(part("csrf_token", token.encode()), part("file", b"d", "a.bin"))
    expected = ([("a.bin", hashlib.sha256(b"d").hexdigest(), 1)], {"csrf_token": token})
    assert parse(client, cut(body, [20, 90]), f'multipart/form-data; boundary="{B}"', token) == expected
    late = body_of(part("file", b"d", "a.bin"), part("csrf_token", token.encode()))
    exc = parse(client, [late], CT, token)
    assert isinstance(exc, Refused) and exc.code == "csrf"
    assert no_temp_files(client)


def test_a_real_multipart_upload_through_uvicorn_stores_the_exact_bytes(tmp_path):
    f.seeded(5)
    path = f.save_safetensors({"w": torch.randn(300_000), "b": torch.randn(77)}, tmp_path / "m.safetensors")
    data = path.read_bytes()
    server = Server(tmp_path / "data")
    try:
        with httpx.Client(base_url=server.base, timeout=60) as http, path.open("rb") as fh:
            r = http.post("/api/v1/checkpoints", data={"name": "via-uvicorn"}, files={"file": (path.name, fh)})
            assert r.status_code == 201, r.text
            made = r.json()
            [stored] = http.get(f"/api/v1/checkpoints/{made['id']}").json()["files"]
            assert stored["sha256"] == hashlib.sha256(data).hexdigest() and stored["size"] == len(data)
            listed = http.get("/api/v1/checkpoints").json()
            assert made["id"] in str(listed) and made["name"] == "via-uvicorn"
    finally:
        server.stop()
