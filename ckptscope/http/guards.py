"""Guards that run before any route, as plain ASGI middleware:

- ``AllowedHosts``: the Host header must name this service (``CKPTSCOPE_ALLOWED_HOSTS``), so a
  DNS-rebinding page (its own name resolving to this machine) cannot talk to it: 400 ``bad_host``;
- ``SameOrigin``: a state-changing request (POST, PUT, PATCH, DELETE) a browser sends from another
  origin, told by ``Sec-Fetch-Site`` or ``Origin``, is refused: 403 ``cross_origin``. SameSite
  cookies do not cover another port or a sibling subdomain; requests with neither header (curl,
  scripts) pass;
- ``BodyLimit``: request bodies other than the uploads' are capped (``CKPTSCOPE_MAX_BODY_BYTES``)
  before they are parsed, by ``Content-Length`` and by counting the bytes as they arrive (chunked
  bodies): 413 ``body_too_large``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import Refused, problem

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UPLOAD_ROUTES = frozenset({("POST", "/api/v1/checkpoints"), ("POST", "/upload")})  # capped by their own limit
HOST_CHECK_EXEMPT = frozenset({"/healthz"})  # a constant answer; container health checks may use any name
DEFAULT_PORTS = {"http": 80, "https": 443}
DRAIN_LIMIT = 1024**2  # bytes of a refused request's body read before answering
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header's ``name[:port]`` (IPv6 in brackets) as (lower-case name without brackets or
    trailing dot, port); None when it is malformed."""
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or not _IPV6.match(name):
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
        if not _NAME.match(name):
            return None
    name = name.lower().rstrip(".")
    if not name:
        return None
    if not rest:
        return name, None
    if rest[0] != ":" or not _PORT.match(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return name, int(rest[1:])


def _origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin header; None for ``null`` or anything malformed."""
    try:
        parts = urlsplit(value)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    return scheme, host.rstrip("."), port or DEFAULT_PORTS[scheme]


def cross_origin_reason(scope: Scope) -> str | None:
    """Why a request is a browser's cross-origin one; None when it is not (or says nothing)."""
    headers = Headers(scope=scope)
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return "refused a state-changing request from another site or origin (Sec-Fetch-Site)"
    origin = headers.get("origin")
    if origin is not None:
        host = split_host(headers.get("host", ""))
        scheme = str(scope.get("scheme", "http"))
        own = None if host is None else (scheme, host[0], host[1] or DEFAULT_PORTS.get(scheme, 0))
        if own is None or _origin(origin.strip()) != own:
            return "refused a state-changing request from another origin (its Origin header is not this service's)"
    return None


async def _drain(receive: Receive, limit: int) -> None:
    """Read (and drop) what a refused request sends, up to ``limit`` bytes: the server can then
    keep the connection instead of closing it under a client still sending, which a browser
    reports as a network error instead of the answer."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


async def refuse(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str, *, drain: bool = True
) -> None:
    """Answer with a problem (or the error page, for the UI) without running the app, after reading
    a small body. The request seen by the renderer has no Host header: URLs made from a hostile one
    could misplace the path."""
    if drain:
        await _drain(receive, DRAIN_LIMIT)
    safe = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k != b"host"]}
    response = problem(Request(safe, receive), status, detail, code)
    await response(scope, receive, send)


class AllowedHosts:
    def __init__(self, app: ASGIApp, names: frozenset[str] | None) -> None:
        self.app = app
        self.names = names  # None: any

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.names is not None and scope["path"] not in HOST_CHECK_EXEMPT:
            given = Headers(scope=scope).getlist("host")
            host = split_host(given[0]) if len(given) == 1 else None
            if host is None or host[0] not in self.names:
                shown = repr(given[0][:100]) if len(given) == 1 else "missing or repeated"
                detail = f"this service does not answer to the Host {shown} (its names: CKPTSCOPE_ALLOWED_HOSTS)"
                await refuse(scope, receive, send, 400, "bad_host", detail)
                return
        await self.app(scope, receive, send)


class SameOrigin:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            reason = cross_origin_reason(scope)
            if reason is not None:
                await refuse(scope, receive, send, 403, "cross_origin", reason)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> Refused:
        return Refused(
            413, "body_too_large", f"the request body exceeds {self.max_bytes} bytes (CKPTSCOPE_MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in UPLOAD_ROUTES:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "").strip()
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
            error = self._error()
            await refuse(scope, receive, send, error.status_code, error.code, error.detail, drain=False)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()  # the route's exception handlers turn it into the 413
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Refused as exc:  # raised where no handler was (a middleware reading the body)
            if started:
                raise
            await refuse(scope, receive, send, exc.status_code, exc.code, exc.detail, drain=False)
