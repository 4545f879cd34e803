"""RFC 9457 problem details for the API; readable HTML error pages for the UI. Every error of
ckptscope's hierarchy (``ckptscope.errors``) is mapped here, once."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from ckptscope.errors import CheckpointError, CkptscopeError, TooLarge

from .rendering import HtmlRenderer

log = logging.getLogger("ckptscope")
SERVICE_PATHS = ("/openapi.json", "/healthz", "/readyz", "/metrics")
MAX_REPORTED_ERRORS = 20


class Refused(StarletteHTTPException):
    """A request the HTTP guards refuse (host, origin, body size, CSRF token, multipart shape), with
    its problem ``code``. An HTTPException, so FastAPI passes it through while reading a body."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(status_code=status, detail=detail)
        self.code = code


def wants_html(request: Request) -> bool:
    path = request.url.path
    return not (path.startswith("/api/") or path in SERVICE_PATHS)


def status_code(status: int) -> str:
    """The code of a problem nothing more specific names: the status phrase in snake case
    (``not_found``, ``method_not_allowed``)."""
    return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


def problem(request: Request, status: int, detail: str, code: str | None = None, **extra: Any) -> Response:
    title = HTTPStatus(status).phrase
    if wants_html(request):
        html: HtmlRenderer = request.app.state.html
        return html.error(request, status, title, detail)
    code = code or status_code(status)  # every problem has a code (the OpenAPI schema requires it)
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def traceback_text(exc: BaseException) -> str:
    """An unhandled error's traceback, once: Starlette's ``BaseHTTPMiddleware`` re-raises it "from"
    an exception group that holds the same error (each middleware layer once more); that chain is
    left out."""
    import traceback

    wrapped = isinstance(exc.__cause__, BaseExceptionGroup)
    return "".join(traceback.format_exception(exc, chain=not wrapped)).rstrip()


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: every method some route takes at the request's path
    (Starlette names only the first such route's). Each method is probed through the routes'
    public ``matches``, FastAPI's included routers among them; mounts (static files) answer their
    own 405s and are left out."""
    allowed = []
    for method in METHODS:
        for route in request.app.router.routes:
            if isinstance(route, Mount):
                continue
            probe = {
                "type": "http",
                "path": request.scope["path"],
                "root_path": request.scope.get("root_path", ""),
                "method": method,
                "headers": [],
            }
            if route.matches(probe)[0] == Match.FULL:
                allowed.append(method)
                break
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    @app.exception_handler(CkptscopeError)
    async def _ours(request: Request, exc: CkptscopeError) -> Response:
        if isinstance(exc, CheckpointError | TooLarge):
            request.app.state.core.metrics.inc("ckptscope_uploads_rejected_total", reason=exc.code)
        return problem(request, exc.status, exc.detail, exc.code, **exc.extra)

    @app.exception_handler(MultipartParseError)
    async def _multipart(request: Request, exc: MultipartParseError) -> Response:
        return problem(request, 400, f"malformed multipart body: {exc}", "bad_multipart")

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(request: Request, exc: ClientDisconnect) -> Response:  # noqa: ARG001
        return problem(request, 400, "the client disconnected before the upload finished", "aborted")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        found = exc.errors()
        errors = [  # a bounded report: a hostile body can fail validation in many places at once
            {"loc": [p[:100] if isinstance(p, str) else p for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in found[:MAX_REPORTED_ERRORS]
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        if len(found) > MAX_REPORTED_ERRORS:
            detail += f"; and {len(found) - MAX_REPORTED_ERRORS} more"
        if any(e.get("type") == "json_invalid" for e in found):  # not JSON at all: a malformed body, 400
            return problem(request, 400, f"malformed JSON body: {detail}", "bad_json", errors=errors)
        return problem(request, 422, detail or "invalid request", "validation", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        response = problem(request, exc.status_code, str(exc.detail), getattr(exc, "code", None))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        allowed = allowed_methods(request) if exc.status_code == 405 else ""
        if allowed:
            response.headers["Allow"] = allowed
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:  # noqa: ARG001
        log.exception("unhandled error on %s", request.url.path)
        return problem(request, 500, "internal error; the server log has the details", "internal")
