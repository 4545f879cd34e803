"""Receive uploaded files by streaming the request body straight into the blob store.

Nothing is buffered in memory beyond the blob writer's few batches in flight: multipart parts and
raw bodies are handed to it as the bytes arrive (a file part's bytes as views of the body's own
chunks, never copied here), and it hashes and writes them on its own threads; the size cap is
enforced while streaming.

The body is read from the server's own ``receive``, which ``UploadBodyPassage`` (the outermost
layer) puts in the scope of an upload route: the ``BaseHTTPMiddleware`` layers between (auth, the
request log) never read an upload's body, yet would start an anyio task group for every body
message of up to ~256 KiB they pass on, which measured ~40% of the server's CPU for an upload.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ckptscope.core import Core
from ckptscope.errors import Invalid, TooLarge
from ckptscope.services.checkpoints import Upload, release_blobs
from ckptscope.store.blobs import BlobWriter

from . import csrf
from .guards import UPLOAD_ROUTES
from .problems import Refused

FIELD_LIMIT = 4096
MAX_PARTS = 1000  # files and fields of one upload (a sharded set has a few hundred files at most)
MULTIPART_OVERHEAD = 64 * 1024
SERVER_RECEIVE = "ckptscope.server_receive"  # scope key: the ASGI server's receive, for an upload route


class UploadBodyPassage:
    """The outermost middleware: gives an upload route the server's ``receive`` (in its scope) so
    the body bypasses the per-message wrapping of the ``BaseHTTPMiddleware`` layers. Only for the
    upload routes, whose body no middleware reads; every other request is untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in UPLOAD_ROUTES:
            scope[SERVER_RECEIVE] = receive
        await self.app(scope, receive, send)


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body as the server delivers it (``request.stream()`` where no passage is)."""
    receive: Receive | None = request.scope.get(SERVER_RECEIVE)
    if receive is None:
        async for chunk in request.stream():
            yield chunk
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if body := message.get("body", b""):
            yield body
        if not message.get("more_body", False):
            return


class _MultipartSink:
    def __init__(self, core: Core, limit: int, csrf_token: str | None) -> None:
        self.core = core
        self.limit = limit
        self.csrf_token = csrf_token  # when set, the form's csrf_token field must precede the files
        self.used = 0
        self.parts = 0
        self.uploads: list[Upload] = []
        self._finished: list[tuple[str, BlobWriter]] = []  # file parts written, not yet committed
        self.fields: dict[str, str] = {}
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._writer: BlobWriter | None = None
        self._filename = ""
        self._form_field: str | None = None
        self._form_value = b""

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, attr: str, data: bytes) -> None:
        value = getattr(self, attr) + data
        if len(value) > FIELD_LIMIT:
            raise Invalid("multipart header too long")
        setattr(self, attr, value)

    def check_csrf(self) -> None:
        """The anti-CSRF field (a plain form sends it first) must match before any file is written."""
        if self.csrf_token is None:
            return
        given = self.fields.get(csrf.FIELD)
        if given is None or not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            raise csrf.refused()
        self.csrf_token = None

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Refused(413, "too_many_parts", f"an upload may have at most {MAX_PARTS} parts (files and fields)")
        self._headers = {}
        self._form_field = None
        self._form_value = b""

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            if name != "file":
                raise Invalid(f"unexpected file field {name[:40]!r}; send files in the field 'file'")
            self.check_csrf()
            self._filename = filename.decode("utf-8", "replace")
            self._writer = self.core.blobs.writer(self.limit - self.used)
        else:
            self._form_field = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._writer is not None:
            self._writer.write(memoryview(data)[start:end])  # a view of the (immutable) body chunk
        elif self._form_field is not None:
            self._form_value += data[start:end]
            if len(self._form_value) > FIELD_LIMIT:
                raise Invalid(f"form field {self._form_field[:40]!r} is too long")

    def _part_end(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self.used += writer.size
            self._finished.append((self._filename, writer))
        elif self._form_field is not None:
            self.fields[self._form_field] = self._form_value.decode("utf-8", "replace")

    async def commit_finished(self) -> None:
        """Commit the file parts that ended (fsync, rename, pin: blocking, so off the event loop)."""
        while self._finished:
            name, writer = self._finished.pop(0)
            try:
                blob = await run_in_threadpool(writer.commit)
            except BaseException:
                writer.abort()
                raise
            self.uploads.append(Upload(name, blob))

    def abort_writers(self) -> None:
        """Drop the temp files of parts not committed. On the event loop (each writer's threads end
        after their current batch): a request cancelled at shutdown may not await anything more."""
        for _, writer in self._finished:
            writer.abort()
        self._finished = []
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def release_committed(self) -> None:
        release_blobs(self.core, [u.blob for u in self.uploads])


async def receive_uploads(
    core: Core, request: Request, filename: str | None, *, csrf_token: str | None = None
) -> tuple[list[Upload], dict[str, str]]:
    """The uploaded files (committed blobs) and the small form fields sent beside them. With
    ``csrf_token`` (the web UI's form, sent without the header), the body must be multipart with a
    matching ``csrf_token`` field before its first file: nothing is written otherwise."""
    limit = core.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise TooLarge(limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        _, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if not boundary:
            raise Invalid("multipart request without a boundary")
        sink = _MultipartSink(core, limit, csrf_token)
        parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
        try:
            async for chunk in _body_chunks(request):
                parser.write(chunk)
                await sink.commit_finished()
            parser.finalize()
            await sink.commit_finished()
            if sink._writer is not None:
                raise Invalid("multipart body ended inside a file part")
            sink.check_csrf()
        except BaseException:
            sink.abort_writers()
            await run_in_threadpool(sink.release_committed)
            raise
        return sink.uploads, sink.fields
    if csrf_token is not None:
        raise csrf.refused()
    writer = core.blobs.writer(limit)
    try:
        async for chunk in _body_chunks(request):
            writer.write(chunk)
    except BaseException:
        writer.abort()  # on the event loop, like the multipart's: see _MultipartSink.abort_writers
        raise
    if writer.size == 0:
        writer.abort()
        raise Invalid("empty request body: send the checkpoint as multipart field 'file' or as the raw body")
    return [Upload(filename or "upload", await run_in_threadpool(writer.commit))], {}
