"""Optional bearer-token auth for the whole service (``CKPTSCOPE_API_TOKEN``).

API calls send ``Authorization: Bearer <token>``; browsers log in once with a form that sets an
HttpOnly, SameSite=Strict cookie holding an HMAC of the token (never the token itself).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

COOKIE = "ckptscope_session"


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"ckptscope-session-v1", hashlib.sha256).hexdigest()


def is_open(path: str) -> bool:
    return path in ("/healthz", "/readyz", "/login") or path.startswith("/static/")


def is_authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer " and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(cookie.encode(), session_value(token).encode())


def safe_next(target: str | None) -> str:
    """Only local paths: no scheme, no host, no protocol-relative //host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
