"""Service endpoints: liveness, readiness, metrics, login/logout (kept out of /api/v1)."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from ckptscope.metrics import CONTENT_TYPE

from . import csrf
from .auth import COOKIE, close_session, open_session, safe_next
from .deps import CoreDep, HtmlDep

router = APIRouter()


class Health(BaseModel):
    status: str


@router.get("/healthz", response_model=Health, tags=["service"])
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Health, tags=["service"], responses={503: {"model": Health}})
def readyz(core: CoreDep) -> Response:
    """Readiness: the catalogue database answers and the data directory is writable."""
    problems = []
    try:
        core.catalogue.ping()
    except Exception as exc:  # any database failure means not ready
        problems.append(f"database: {type(exc).__name__}")
    if not os.access(core.blobs.tmp_dir, os.W_OK) or not core.blobs.blob_dir.is_dir():
        problems.append("data directory not writable")
    if problems:
        return JSONResponse({"status": "; ".join(problems)}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=PlainTextResponse, tags=["service"])
def metrics(core: CoreDep) -> Response:
    """Prometheus text format: request latency by route, requests and 5xx errors, uploads and their
    bytes, rejections and parse failures by code, stats jobs, throughput and queue depth; summed over
    the server processes that share the data directory."""
    return Response(core.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, html: HtmlDep, next: str = "/") -> Response:
    return html.page(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
async def login(
    request: Request,
    core: CoreDep,
    html: HtmlDep,
    token: Annotated[str, Form(max_length=4096)] = "",
    next: Annotated[str, Form(max_length=4096)] = "/",
) -> Response:
    expected = core.settings.api_token
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        context = {"next": safe_next(next), "error": "That token is not right."}
        return html.page(request, "login.html", context, status=401)
    ttl = core.settings.session_ttl_s
    await run_in_threadpool(close_session, core.queries, request)  # a session the browser had is replaced
    session_id = await run_in_threadpool(open_session, core.queries, expected, ttl)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=max(1, int(ttl)),
        path="/",
    )
    csrf.set_cookie(response, request, csrf.new_token())  # a new session, a new anti-CSRF token
    return response


@router.post("/logout", include_in_schema=False, dependencies=[Depends(csrf.require_csrf)])
async def logout(request: Request, core: CoreDep) -> Response:
    """Ends the session server-side (the cookie alone no longer opens anything)."""
    await run_in_threadpool(close_session, core.queries, request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    csrf.set_cookie(response, request, csrf.new_token())
    return response
