"""The web UI's anti-CSRF token (double submit).

Each browser gets a random token in an HttpOnly, SameSite=Strict cookie (issued with the first page
it loads, renewed at login and logout). Pages carry the same value in every form (hidden field
``csrf_token``) and in every htmx request (``hx-headers`` on ``<body>``: ``X-CSRF-Token``); the UI's
state-changing routes refuse a request whose value is missing or differs from the cookie's (403
``csrf``). Another origin can read neither the cookie nor the page, so it cannot send the value.
This backs up the same-origin check (``guards.SameOrigin``) for browsers that send neither
``Origin`` nor ``Sec-Fetch-Site``. API calls with a bearer token need no token.
"""

from __future__ import annotations

import hmac
import re
import secrets

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import SERVICE_PATHS, Refused

COOKIE = "ckptscope_csrf"
HEADER = "x-csrf-token"
FIELD = "csrf_token"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_token(request: Request) -> str | None:
    """The token of the request's cookie, when it has a well-formed one."""
    value = request.cookies.get(COOKIE)
    return value if value and _TOKEN.match(value) else None


def matches(request: Request, given: str | None) -> bool:
    expected = cookie_token(request)
    return expected is not None and given is not None and hmac.compare_digest(given.encode(), expected.encode())


def refused() -> Refused:
    return Refused(403, "csrf", "the anti-CSRF token is missing or wrong: reload the page and try again")


async def require_csrf(request: Request) -> None:
    """Dependency of the UI's state-changing routes: the token from the ``X-CSRF-Token`` header
    (htmx) or the form's ``csrf_token`` field (a plain form post). The form is small here: the body
    cap (``guards.BodyLimit``) holds before it is parsed."""
    given = request.headers.get(HEADER)
    if given is None and request.headers.get("content-type", "").startswith(_FORMS):
        value = (await request.form()).get(FIELD)
        given = value if isinstance(value, str) else None
    if not matches(request, given):
        raise refused()


def set_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")


def _page(path: str) -> bool:
    return not (path.startswith(("/api/", "/static/")) or path in SERVICE_PATHS)


class CsrfCookie:
    """ASGI middleware: the request's token in ``request.state.csrf`` for the templates, and a new
    one (with its cookie on the response) for a browser that has none."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = cookie_token(Request(scope))
        fresh = token is None
        token = token or new_token()
        scope.setdefault("state", {})["csrf"] = token
        if not fresh or not _page(scope["path"]):
            await self.app(scope, receive, send)
            return
        attributes = "; Path=/; HttpOnly; SameSite=strict" + ("; Secure" if scope.get("scheme") == "https" else "")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("set-cookie", f"{COOKIE}={token}{attributes}")
            await send(message)

        await self.app(scope, receive, send_with_cookie)
