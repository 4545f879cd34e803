"""The FastAPI application: API, web UI, static assets, security headers."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match

from ckptscope import __version__, logs, metrics
from ckptscope.api import openapi
from ckptscope.api.routes import ops_router
from ckptscope.api.routes import router as api_router
from ckptscope.config import Settings, get_settings
from ckptscope.core import Core
from ckptscope.http import problems
from ckptscope.http.auth import has_bearer, has_session, is_open
from ckptscope.http.csrf import CsrfCookie
from ckptscope.http.guards import AllowedHosts, BodyLimit, SameOrigin
from ckptscope.http.service_routes import router as service_router
from ckptscope.http.uploads import UploadBodyPassage
from ckptscope.web.routes import router as web_router
from ckptscope.web.templating import RENDERER, STATIC_DIR

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

log = logging.getLogger("ckptscope")
access_log = logging.getLogger("ckptscope.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_environment() -> None:
    """Refuse to run where torch could be told to unpickle arbitrary code."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        raise RuntimeError(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: it makes torch.load run pickled code. "
            "ckptscope refuses to start with it; unset it."
        )


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes in routing order, included routers' own flattened (FastAPI keeps them whole)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        else:
            yield route


def route_label(app: FastAPI, request: Request) -> str:
    """The path template of the route that served (or would have served) the request, e.g.
    ``/api/v1/checkpoints/{checkpoint_id}`` or ``/static``: a bounded metric label, never the raw URL."""
    path = getattr(request.scope.get("route"), "path", None)  # set by the API and page routes
    if isinstance(path, str) and path:
        return path
    # a mount (static files; routing moved its prefix to root_path, so find it by its app), or a
    # request refused before routing (auth, host, origin): the route it asked for
    endpoint = request.scope.get("endpoint")
    for candidate in _routes(app.router.routes):
        path = getattr(candidate, "path", None)
        if not isinstance(path, str) or not path:
            continue
        if endpoint is not None:
            if endpoint is getattr(candidate, "app", None) or endpoint is getattr(candidate, "endpoint", None):
                return path
        elif candidate.matches(request.scope)[0] != Match.NONE:
            return path
    return metrics.UNMATCHED_ROUTE


def create_app(settings: Settings | None = None) -> FastAPI:
    check_environment()
    logs.configure()
    serving = settings is None  # the server's factory (`ckptscope serve`, `uvicorn --factory`)
    settings = settings or get_settings()
    if serving:  # processes sharing the data dir report summed metrics; set before Core makes any
        metrics.share_across_processes(settings.data_dir / "metrics")
    core = Core(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        core.start()
        log.info(
            "ckptscope %s: data in %s, catalogue %s",
            __version__,
            settings.data_dir,
            settings.resolved_database_url.split("@")[-1],
        )
        try:
            yield
        finally:
            core.close()

    app = FastAPI(
        title="ckptscope",
        version=__version__,
        description="Inspect model checkpoints: module tree, per-tensor statistics.",
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=openapi.operation_id,
        lifespan=lifespan,
    )
    app.state.core = core
    app.state.html = RENDERER  # the HTTP layer renders login pages and errors through it
    problems.install(app)
    openapi.install(app)  # the document FastAPI builds, finished (errors, security, operation ids)
    app.include_router(service_router)
    app.include_router(api_router)
    app.include_router(ops_router)
    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Middleware runs outermost first: the request log (with the security headers), the Host and
    # same-origin guards, the anti-CSRF cookie, auth, then the body cap. Each add_middleware call
    # wraps what was added before it, so they are added innermost first. The body cap sits right
    # above the routes: its error, raised while a route reads the body, must reach the route's
    # exception handlers without crossing a BaseHTTPMiddleware (whose task groups would wrap it).
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        token = settings.api_token
        if (
            token
            and not is_open(request.url.path)
            and not has_bearer(request, token)
            and not await run_in_threadpool(has_session, core.queries, request, token)
        ):
            if problems.wants_html(request) and request.method == "GET":
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            response = problems.problem(
                request, 401, "authentication required: send Authorization: Bearer <token>", "unauthorized"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="ckptscope"'
            return response
        return await call_next(request)

    app.add_middleware(CsrfCookie)
    app.add_middleware(SameOrigin)
    app.add_middleware(AllowedHosts, names=settings.allowed_host_names)

    @app.middleware("http")
    async def request_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: its traceback logged once here, answered as a problem, then counted
            where = f"{request.method} {request.scope['path']}"
            fields = {"request_id": request_id, "exc": problems.traceback_text(exc)}
            log.error("unhandled error on %s", where, extra={"fields": fields})
            detail = "internal error; the server log has the details (request id in request_id)"
            response = problems.problem(request, 500, detail, "internal", request_id=request_id)
        elapsed = time.perf_counter() - started
        response.headers["X-Request-ID"] = request_id
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        route = route_label(app, request)
        core.metrics.request(route, request.method, response.status_code, elapsed)
        access_log.info(
            "request",
            extra={
                "fields": {
                    "request_id": request_id,
                    "method": request.method,
                    "path": request.scope["path"],
                    "route": route,
                    "status": response.status_code,
                    "ms": round(elapsed * 1e3, 2),
                    "client": request.client.host if request.client else None,
                }
            },
        )
        return response

    app.add_middleware(UploadBodyPassage)  # outermost: an upload's body skips the layers above
    return app
