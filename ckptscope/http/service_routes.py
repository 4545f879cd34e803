"""Service endpoints: liveness, readiness, metrics, login/logout (kept out of /api/v1)."""

from __future__ import annotations

import hmac
import os
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel

from .auth import COOKIE, safe_next, session_value
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
def metrics(core: CoreDep) -> PlainTextResponse:
    """Prometheus text format: requests, errors, uploads, bytes, rejections, job durations."""
    return PlainTextResponse(core.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, html: HtmlDep, next: str = "/") -> Response:
    return html.page(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login", include_in_schema=False)
def login(
    request: Request,
    core: CoreDep,
    html: HtmlDep,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    expected = core.settings.api_token
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        context = {"next": safe_next(next), "error": "That token is not right."}
        return html.page(request, "login.html", context, status=401)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        session_value(expected),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=14 * 24 * 3600,
    )
    return response


@router.post("/logout", include_in_schema=False)
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
