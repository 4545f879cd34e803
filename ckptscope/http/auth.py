"""Optional bearer-token auth for the whole service (``CKPTSCOPE_API_TOKEN``).

API calls send ``Authorization: Bearer <token>``; browsers log in once with a form that opens a
session: a random id in an HttpOnly, SameSite=Strict cookie, stored server-side (hashed) in the
catalogue with an expiry (``CKPTSCOPE_SESSION_TTL_S``) and a fingerprint of the token, so that
logout revokes it, a new token ends every older session, and all server processes share them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from starlette.requests import Request

from ckptscope.store.catalogue import utcnow
from ckptscope.store.queries import CatalogueQueries

COOKIE = "ckptscope_session"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


def token_fingerprint(token: str) -> str:
    """What a session remembers of the token it was opened with (not the token)."""
    return hmac.new(token.encode(), b"ckptscope-session-token-v2", hashlib.sha256).hexdigest()


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _cookie_id(request: Request) -> str | None:
    value = request.cookies.get(COOKIE)
    return value if value and _SESSION_ID.match(value) else None


def open_session(queries: CatalogueQueries, token: str, ttl_s: float) -> str:
    """A new session's id (for the cookie); the catalogue keeps only its hash."""
    session_id = secrets.token_urlsafe(32)
    queries.create_session(_id_hash(session_id), token_fingerprint(token), utcnow() + timedelta(seconds=ttl_s))
    return session_id


def close_session(queries: CatalogueQueries, request: Request) -> None:
    session_id = _cookie_id(request)
    if session_id is not None:
        queries.revoke_session(_id_hash(session_id))


def is_open(path: str) -> bool:
    return path in ("/healthz", "/readyz", "/login") or path.startswith("/static/")


def has_bearer(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    return header[:7].lower() == "bearer " and hmac.compare_digest(header[7:].strip().encode(), token.encode())


def has_session(queries: CatalogueQueries, request: Request, token: str) -> bool:
    """A live session opened with the current token (one catalogue lookup; blocking)."""
    session_id = _cookie_id(request)
    return session_id is not None and queries.session_valid(_id_hash(session_id), token_fingerprint(token))


def safe_next(target: str | None) -> str:
    """Only local paths: no scheme, no host, no protocol-relative //host."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
